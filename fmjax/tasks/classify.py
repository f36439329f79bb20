"""Text classification: a pretrained encoder + a classifier head, adapted by the
method in `config.adapt` (full, lora, qlora, prefix, prompt).

`init.model` names the pretrained model: an HF BERT directory (config.json +
model.safetensors + vocab) or an fmjax workdir / export directory. Its
architecture and tokenizer are used as they are; `config.model` overrides only
the head and the numerics (num_classes, classifier_pooling, dropout, dtype,
remat). With `init.pretrained=False` the same architecture starts from random
weights (the from-scratch baseline).

The resolved config (the full model config, the label names) is the task's
`config`, so the run's config.json describes the model alone.
"""

from __future__ import annotations

import copy

import jax
import numpy as np

from fmjax import objectives
from fmjax.config import ConfigError
from fmjax.data import classification as cls_data
from fmjax.data import labeled, sources
from fmjax.data.sharded import ShardedIterator
from fmjax.tasks import pretrained as pretrained_lib
from fmjax.tasks.base import (
    SplitEvaluator,
    Task,
    on_process_zero_first,
    validate_data_shards,
    validate_sizes,
)

# config.model keys a classification run may set over the pretrained model's.
MODEL_OVERRIDES = (
    "num_classes",
    "classifier_pooling",
    *pretrained_lib.NUMERICS,
)
HEAD = "classifier/"


def _validate(config) -> None:
    """Checks that need no data or weights."""
    fields = tuple(config.data.text_fields)
    if not 1 <= len(fields) <= 2:
        raise ConfigError(
            f"data.text_fields={fields}: expected one text field or two (a pair)"
        )
    if config.data.train_examples < 0:
        raise ConfigError(
            f"data.train_examples={config.data.train_examples}: expected 0 (all) or "
            "a positive count"
        )
    if not pretrained_lib.init_model_path(config):
        raise ConfigError(
            "init.model is empty: set --config.init.model=DIR, an HF BERT directory "
            "(config.json + model.safetensors + vocab.txt) or an fmjax workdir"
        )
    validate_sizes(config, ("data", "seq_len"))


class ClassifyTask(Task):
    objectives = ("classify",)
    throughput_unit = "tokens"
    new_param_prefixes = (HEAD,)

    def __init__(self, config, model_config, *, tokenizer, pretrained, names):
        super().__init__(
            config, model_config, tokenizer=tokenizer, pretrained=pretrained
        )
        data = config.data
        self.label_names = list(names)
        self.data_name = data.name
        self.data_dir = data.data_dir or sources.default_data_dir()
        self.seq_len = data.seq_len
        self.text_fields = tuple(data.text_fields)
        self.train_split = data.train_split
        self.test_split = data.get("test_split", "")
        self._sources: dict[str, labeled.LabeledSource] = {}

    @classmethod
    def from_config(cls, config, *, with_data: bool = True) -> ClassifyTask:
        config = copy.deepcopy(config)
        _validate(config)
        data = config.data
        data_dir = data.data_dir or sources.default_data_dir()
        names = tuple(data.label_names)
        if with_data:
            validate_data_shards(config)
            if data.name in sources.SHIPPED:
                on_process_zero_first(lambda: sources.prepare(data.name, data_dir))
            try:
                names = labeled.label_names(
                    data.name,
                    text_fields=tuple(data.text_fields),
                    label_field=data.label_field,
                    label_names=names or None,
                    data_dir=data_dir,
                )
            except (sources.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.name={data.name!r}: {e}") from None
        num_classes = len(names) or config.model.get("num_classes", 0) or 2
        arch, params, tokenizer = pretrained_lib.load_pretrained(
            pretrained_lib.init_model_path(config)
        )
        overrides = dict(config.model)
        if not overrides.get("num_classes"):
            overrides["num_classes"] = num_classes
        elif overrides["num_classes"] != num_classes:
            raise ConfigError(
                f"model.num_classes={overrides['num_classes']} but the data has "
                f"{num_classes} labels; leave model.num_classes=0 to take it from "
                "the data"
            )
        model_config = pretrained_lib.resolve_model_config(
            arch,
            overrides,
            kind="encoder",
            settable=MODEL_OVERRIDES,
            fixed={"mlm_head": False},
        )
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"init.model's tokenizer has {tokenizer.vocab_size} tokens, more "
                f"than its vocab_size={model_config.vocab_size}"
            )
        if data.seq_len > model_config.max_len:
            raise ConfigError(
                f"data.seq_len={data.seq_len} is longer than the model's "
                f"max_len={model_config.max_len}"
            )
        config.model = model_config.to_dict()
        config.data.label_names = tuple(names)
        if with_data and data.test_split:
            splits = labeled.split_names(
                data.name,
                text_fields=tuple(data.text_fields),
                label_field=data.label_field,
                data_dir=data_dir,
            )
            if data.test_split not in splits:
                if jax.process_index() == 0:
                    print(
                        f"{data.name} has no {data.test_split!r} split (it has "
                        f"{splits}): reporting {data.eval_split!r} only"
                    )
                config.data.test_split = ""
        task = cls(
            config,
            model_config,
            tokenizer=tokenizer,
            pretrained=params if config.init.pretrained else None,
            names=names,
        )
        if with_data:
            train = task._source(task.train_split)  # bad splits fail before compute
            for split in (task.eval_split, task.test_split):
                if split:
                    task._source(split)
            if len(train) < jax.process_count():
                raise ConfigError(
                    f"data split {task.train_split!r} has {len(train)} rows"
                )
        return task

    # --- data ---------------------------------------------------------------------

    def _source(self, split: str) -> labeled.LabeledSource:
        if split not in self._sources:
            self._sources[split] = self._load_source(split)
        return self._sources[split]

    def _load_source(self, split: str) -> labeled.LabeledSource:
        data = self.config.data
        try:
            source = labeled.load_labeled_source(
                self.data_name,
                split,
                text_fields=self.text_fields,
                label_field=data.label_field,
                label_names=self.label_names,
                validation_fraction=data.validation_fraction,
                seed=data.shuffle_seed,
                data_dir=self.data_dir,
            )
        except (sources.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
            raise ConfigError(
                f"data split {split!r} of {self.data_name!r}: {e}"
            ) from None
        if split == self.train_split and data.train_examples:
            if data.train_examples > len(source):
                raise ConfigError(
                    f"data.train_examples={data.train_examples} but split {split!r} "
                    f"has {len(source)}"
                )
            source = labeled.take_subset(source, data.train_examples, data.shuffle_seed)
        return source

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        batch = {
            k: jax.ShapeDtypeStruct((rows, self.seq_len), np.int32)
            for k in cls_data.BATCH_KEYS
            if k not in ("labels", "weights")
        }
        batch["labels"] = jax.ShapeDtypeStruct((rows,), np.int32)
        batch["weights"] = jax.ShapeDtypeStruct((rows,), np.float32)
        return batch

    def train_iterator(self) -> ShardedIterator:
        source = self._source(self.train_split)
        seed = self.config.data.shuffle_seed

        def shard(index: int, count: int, rows: int):
            return cls_data.make_classification_iterator(
                source,
                self.tokenizer,
                seq_len=self.seq_len,
                batch_size=rows,
                seed=seed,
                text_fields=self.text_fields,
                process_index=index,
                process_count=count,
            )

        return self.sharded_iterator(shard)

    def eval_iterator(self, split: str | None = None):
        return cls_data.make_classification_eval_iterator(
            self._source(split or self.eval_split),
            self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size // jax.process_count(),
            text_fields=self.text_fields,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def throughput(self, local_batch) -> int:
        return int(np.count_nonzero(local_batch["segment_ids"]))

    # --- loss -----------------------------------------------------------------------

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            dropout_rng, adapter_rng = jax.random.split(rng)
            out = adaptation.apply(
                model,
                params,
                frozen,
                adapter_rng,
                train,
                batch["tokens"],
                segment_ids_BL=batch["segment_ids"],
                positions_BL=batch["positions"],
                type_ids_BL=batch["type_ids"],
                deterministic=not train,
                rngs={"dropout": dropout_rng},
            )
            _, sums = objectives.classification_loss(
                out["class_logits"], batch["labels"], batch["weights"]
            )
            return sums

        return loss_fn

    def summarize(self, sums) -> dict[str, float]:
        """loss and accuracy per example."""
        out = objectives.summarize(sums)
        return {k: float(out[k]) for k in ("loss", "accuracy", "count")}

    @property
    def evaluators(self) -> tuple:
        return (SplitEvaluator(self.test_split, "test"),) if self.test_split else ()

    def summary(self) -> dict:
        return {"train_examples": len(self._source(self.train_split))}
