"""Text pre-training experiments: the config checks, data and loss of one run.

Everything here runs before any compute and raises `ConfigError` with the bad
key and value, so `fmjax train` fails in a second instead of after compiling.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fmjax.config import ConfigError
from fmjax.data import sources
from fmjax.data import text as text_data
from fmjax.data.tokenizer import tokenizer_for
from fmjax.models.config import TransformerConfig
from fmjax.train.step import text_loss_fn

OBJECTIVE_MODEL = {"mlm": "encoder", "causal": "decoder"}


def validate(config) -> None:
    """Checks that need no data: value ranges and the pieces fitting together."""
    objective = config.objective.name
    if objective == "classify":
        from fmjax.train import classify

        classify.validate(config)
        _validate_sizes(config, ())
        return
    if objective not in OBJECTIVE_MODEL:
        raise ConfigError(
            f"objective.name={objective!r}; expected one of {sorted(OBJECTIVE_MODEL)}"
        )
    kind = config.model.kind
    if kind != OBJECTIVE_MODEL[objective]:
        raise ConfigError(
            f"model.kind={kind!r} cannot train objective {objective!r}; it needs "
            f"model.kind={OBJECTIVE_MODEL[objective]!r}"
        )
    model_fields = {k: v for k, v in config.model.items() if k != "kind"}
    try:
        TransformerConfig.from_dict(model_fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    if config.data.seq_len > config.model.max_len:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than "
            f"model.max_len={config.model.max_len}"
        )
    if config.data.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"vocabulary/model size mismatch: data.vocab_size={config.data.vocab_size}"
            f" tokens but model.vocab_size={config.model.vocab_size} embeddings; "
            f"set --config.model.vocab_size={config.data.vocab_size} (or larger)"
        )
    _validate_sizes(config, (("data", "vocab_size"),))
    if not 0.0 < config.objective.get("mask_rate", 0.15) < 1.0:
        raise ConfigError(
            f"objective.mask_rate={config.objective.mask_rate}: expected in (0, 1)"
        )


def _validate_sizes(config, extra_positive) -> None:
    """Positive sizes and a batch that splits over accumulation and processes."""
    for group, key in [
        ("train", "steps"),
        ("train", "log_every"),
        ("data", "seq_len"),
        ("data", "batch_size"),
        ("checkpoint", "every"),
        ("optimizer", "grad_accum_steps"),
        *extra_positive,
    ]:
        value = config[group][key]
        if value < 1:
            raise ConfigError(f"{group}.{key}={value}: expected a positive integer")
    batch, accum = config.data.batch_size, config.optimizer.grad_accum_steps
    if batch % accum:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by "
            f"optimizer.grad_accum_steps={accum}"
        )
    processes = jax.process_count()
    if batch % processes:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by the {processes} processes"
        )
    shards = config.data.get("num_shards", 0) or processes
    if shards % processes or batch % shards:
        raise ConfigError(
            f"data.num_shards={shards} must be a multiple of the {processes} processes "
            f"and divide data.batch_size={batch}"
        )


def _prepare(name: str, vocab_size: int, data_dir: str):
    if name in sources.SHIPPED:
        sources.prepare(name, data_dir)
    try:
        return tokenizer_for(name, vocab_size, data_dir)
    except ValueError as e:
        raise ConfigError(f"data.vocab_size={vocab_size}: {e}") from None


@dataclasses.dataclass
class TextExperiment:
    name: str
    data_dir: str
    train_split: str
    eval_split: str
    text_key: str
    seq_len: int
    batch_size: int
    objective: str
    mask_rate: float
    seed: int
    shuffle_seed: int
    num_shards: int
    tokenizer: object
    model_config: dict

    @classmethod
    def from_config(cls, config) -> TextExperiment:
        validate(config)
        data = config.data
        data_dir = data.data_dir or sources.default_data_dir()
        try:
            sources.check_dataset(data.name, data_dir)
        except sources.DatasetNotFoundError as e:
            raise ConfigError(f"data.name={data.name!r}: {e}") from None
        # Process 0 builds the dataset and tokenizer once; the others wait for it.
        if jax.process_index() == 0:
            tokenizer = _prepare(data.name, data.vocab_size, data_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fmjax: data prepared")
            if jax.process_index() != 0:
                tokenizer = _prepare(data.name, data.vocab_size, data_dir)
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"vocabulary/model size mismatch: the tokenizer has "
                f"{tokenizer.vocab_size} tokens, model.vocab_size="
                f"{config.model.vocab_size}"
            )
        exp = cls(
            name=data.name,
            data_dir=data_dir,
            train_split=data.train_split,
            eval_split=data.eval_split,
            text_key=data.text_key,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            objective=config.objective.name,
            mask_rate=config.objective.get("mask_rate", 0.15),
            seed=config.train.seed,
            shuffle_seed=data.shuffle_seed,
            num_shards=data.get("num_shards", 0) or jax.process_count(),
            tokenizer=tokenizer,
            model_config=dict(config.model),
        )
        for split in (exp.train_split, exp.eval_split):
            exp._source(split)  # a bad split name fails here, before compute
        return exp

    def _source(self, split: str):
        try:
            return sources.load_source(self.name, split, self.data_dir)
        except (sources.DatasetNotFoundError, ValueError, KeyError) as e:
            raise ConfigError(f"data split {split!r} of {self.name!r}: {e}") from None

    def train_iterator(self) -> text_data.ShardedTextIterator:
        return text_data.ShardedTextIterator(
            self._source(self.train_split),
            self.tokenizer,
            num_shards=self.num_shards,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            objective=self.objective,
            text_key=self.text_key,
            seed=self.shuffle_seed,
            shuffle=True,
            repeat=True,
        )

    def eval_iterator(self, split: str | None = None):
        """This process's slice of the eval split, every example once. Processes
        may get different batch counts: `loop.evaluate` pads the short ones."""
        return text_data.make_eval_iterator(
            self._source(split or self.eval_split),
            self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size // jax.process_count(),
            objective=self.objective,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            text_key=self.text_key,
        )

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        """An all-padding batch (no tokens count) for a process with no eval rows."""
        return {
            k: np.zeros((rows, self.seq_len), np.int32) for k in text_data.BATCH_KEYS
        }

    def loss_fn(self, model):
        tok = self.tokenizer
        return text_loss_fn(
            model,
            self.objective,
            mask_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            special_ids=tuple(tok.special_ids),
            mask_rate=self.mask_rate,
        )
