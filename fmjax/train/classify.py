"""Text classification runs: a pretrained encoder + a classifier head, adapted by
the method in `config.adapt` (full, lora, qlora, prefix, prompt).

`init.model` names the pretrained model: an HF BERT directory (config.json +
model.safetensors + vocab) or an fmjax workdir / export directory. Its
architecture and tokenizer are used as they are; `config.model` overrides only
the head and the numerics (num_classes, classifier_pooling, dropout, dtype,
remat). With `init.pretrained=False` the same architecture starts from random
weights (the from-scratch baseline).

`from_config` writes what it resolved back into the config (the full model
config, the label names), so the run's config.json describes the model alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from fmjax.adapt.methods import METHODS, Adaptation
from fmjax.config import ConfigError
from fmjax.data import classification as cls_data
from fmjax.data import labeled, sources
from fmjax.data.tokenizer import load_tokenizer
from fmjax.models.config import TransformerConfig
from fmjax.train.step import classification_loss_fn

# config.model keys a classification run may set over the pretrained model's.
MODEL_OVERRIDES = (
    "num_classes",
    "classifier_pooling",
    "dropout_rate",
    "attention_dropout_rate",
    "dtype",
    "remat",
)


def load_pretrained(path: str) -> tuple[dict, dict, Any]:
    """(model config dict with `kind`, params as numpy, tokenizer) of an HF BERT
    directory or an fmjax workdir / export."""
    from fmjax.convert import hf
    from fmjax.export import find_export, load_export

    if not path:
        raise ConfigError(
            "init.model is empty: set --config.init.model=DIR, an HF BERT directory "
            "(config.json + model.safetensors + vocab.txt) or an fmjax workdir"
        )
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ConfigError(f"init.model={path!r} does not exist")
    try:
        if hf.is_hf_directory(path):
            model_config, params, tokenizer = hf.load_hf_bert(path)
            return dict(model_config), params, tokenizer
        params, config = load_export(path)
        tokenizer = load_tokenizer(find_export(path))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init.model={path!r}: {e}") from None
    model_config = dict(config["model"])
    if model_config.get("kind") != "encoder":
        raise ConfigError(
            f"init.model={path!r} is a {model_config.get('kind')!r}; classification "
            "fine-tunes an encoder (model.kind='encoder')"
        )
    return model_config, params, tokenizer


def resolve_model_config(pretrained: dict, overrides, num_classes: int) -> dict:
    """The classifier's model config: the pretrained architecture, no MLM head,
    `num_classes` outputs, and the allowed `config.model` overrides."""
    arch = {k: v for k, v in pretrained.items() if k != "kind"}
    arch = {**TransformerConfig.from_dict(arch).to_dict(), "mlm_head": False}
    # A saved run's config repeats the architecture: equal values are fine.
    unknown = sorted(
        k
        for k, v in overrides.items()
        if k not in (*MODEL_OVERRIDES, "kind") and arch.get(k, object()) != v
    )
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}={overrides[unknown[0]]!r} cannot be set for "
            f"classification: the architecture comes from init.model "
            f"({unknown[0]}={arch.get(unknown[0])!r}); settable: "
            f"{list(MODEL_OVERRIDES)}"
        )
    model = dict(arch)
    model.update({k: v for k, v in overrides.items() if k != "kind"})
    if not model.get("num_classes"):
        model["num_classes"] = num_classes
    elif model["num_classes"] != num_classes:
        raise ConfigError(
            f"model.num_classes={model['num_classes']} but the data has "
            f"{num_classes} labels; leave model.num_classes=0 to take it from the data"
        )
    fields = {k: v for k, v in model.items() if k != "kind"}
    try:
        TransformerConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return {"kind": "encoder", **fields}


def overlay_pretrained(params, pretrained) -> dict:
    """`params` (a fresh init) with every param that `pretrained` has replaced;
    the pretrained MLM head, which the classifier lacks, is dropped. A shape
    mismatch or a non-head param the checkpoint lacks raises."""
    import flax.traverse_util as tu

    flat = tu.flatten_dict(params, sep="/")
    given = tu.flatten_dict(pretrained, sep="/")
    missing = [p for p in flat if p not in given and not p.startswith("classifier/")]
    if missing:
        raise ValueError(f"init.model lacks params {missing[:5]}")
    for path, value in given.items():
        if path not in flat:
            continue
        if tuple(np.shape(value)) != tuple(flat[path].shape):
            raise ValueError(
                f"init.model param {path} has shape {np.shape(value)}; the model "
                f"expects {tuple(flat[path].shape)}"
            )
        flat[path] = jax.numpy.asarray(value, flat[path].dtype)
    return tu.unflatten_dict(flat, sep="/")


def validate(config) -> None:
    """Checks that need no data or weights."""
    if config.objective.name != "classify":
        raise ConfigError(
            f"objective.name={config.objective.name!r}: expected classify"
        )
    if config.adapt.method not in METHODS:
        raise ConfigError(
            f"adapt.method={config.adapt.method!r}: expected one of {METHODS}"
        )
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


@dataclasses.dataclass
class ClassifyExperiment:
    name: str
    data_dir: str
    train_split: str
    eval_split: str
    test_split: str
    text_fields: tuple[str, ...]
    label_field: str
    label_names: list[str]
    train_examples: int
    validation_fraction: float
    seq_len: int
    batch_size: int
    seed: int
    shuffle_seed: int
    tokenizer: Any
    model_config: dict
    pretrained: dict | None
    adaptation: Adaptation

    @classmethod
    def from_config(cls, config) -> ClassifyExperiment:
        validate(config)
        data = config.data
        data_dir = data.data_dir or sources.default_data_dir()
        if data.name in sources.SHIPPED and jax.process_index() == 0:
            sources.prepare(data.name, data_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fmjax: data prepared")
        try:
            names = labeled.label_names(
                data.name,
                text_fields=tuple(data.text_fields),
                label_field=data.label_field,
                label_names=tuple(data.label_names) or None,
                data_dir=data_dir,
            )
        except (sources.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.name={data.name!r}: {e}") from None
        arch, params, tokenizer = load_pretrained(config.init.model)
        model_config = resolve_model_config(arch, config.model, len(names))
        if tokenizer.vocab_size > model_config["vocab_size"]:
            raise ConfigError(
                f"init.model's tokenizer has {tokenizer.vocab_size} tokens, more "
                f"than its vocab_size={model_config['vocab_size']}"
            )
        if data.seq_len > model_config["max_len"]:
            raise ConfigError(
                f"data.seq_len={data.seq_len} is longer than the model's "
                f"max_len={model_config['max_len']}"
            )
        fields = {k: v for k, v in model_config.items() if k != "kind"}
        try:
            adaptation = Adaptation.from_config(
                config.adapt, TransformerConfig.from_dict(fields)
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # The run's config.json then describes the model without init.model.
        config.model = model_config
        config.data.label_names = tuple(names)
        exp = cls(
            name=data.name,
            data_dir=data_dir,
            train_split=data.train_split,
            eval_split=data.eval_split,
            test_split=data.test_split,
            text_fields=tuple(data.text_fields),
            label_field=data.label_field,
            label_names=list(names),
            train_examples=data.train_examples,
            validation_fraction=data.validation_fraction,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            seed=config.train.seed,
            shuffle_seed=data.shuffle_seed,
            tokenizer=tokenizer,
            model_config=model_config,
            pretrained=params if config.init.pretrained else None,
            adaptation=adaptation,
        )
        train = exp._source(exp.train_split)  # bad splits fail here, before compute
        for split in (exp.eval_split, exp.test_split):
            if split:
                exp._source(split)
        if len(train) < jax.process_count():
            raise ConfigError(f"data split {exp.train_split!r} has {len(train)} rows")
        return exp

    def _source(self, split: str) -> labeled.LabeledSource:
        cache = self.__dict__.setdefault("_sources", {})
        if split not in cache:
            cache[split] = self._load_source(split)
        return cache[split]

    def _load_source(self, split: str) -> labeled.LabeledSource:
        try:
            source = labeled.load_labeled_source(
                self.name,
                split,
                text_fields=self.text_fields,
                label_field=self.label_field,
                label_names=self.label_names,
                validation_fraction=self.validation_fraction,
                seed=self.shuffle_seed,
                data_dir=self.data_dir,
            )
        except (sources.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data split {split!r} of {self.name!r}: {e}") from None
        if split == self.train_split and self.train_examples:
            if self.train_examples > len(source):
                raise ConfigError(
                    f"data.train_examples={self.train_examples} but split {split!r} "
                    f"has {len(source)}"
                )
            source = labeled.take_subset(source, self.train_examples, self.shuffle_seed)
        return source

    def num_train_examples(self) -> int:
        return len(self._source(self.train_split))

    def train_iterator(self):
        count = jax.process_count()
        return cls_data.make_classification_iterator(
            self._source(self.train_split),
            self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size // count,
            seed=self.shuffle_seed,
            text_fields=self.text_fields,
            process_index=jax.process_index(),
            process_count=count,
        )

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

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        """An all-padding batch (weight 0) for a process with no eval rows left."""
        batch = {
            k: np.zeros((rows, self.seq_len), np.int32)
            for k in cls_data.BATCH_KEYS
            if k not in ("labels", "weights")
        }
        batch["labels"] = np.zeros((rows,), np.int32)
        batch["weights"] = np.zeros((rows,), np.float32)
        return batch

    def loss_fn(self, model):
        return classification_loss_fn(model, combine=self.adaptation.combine)
