"""Text pre-training tasks: masked LM ("mlm", an encoder) and next-token
prediction ("causal", a decoder), on packed rows of a TFDS text dataset.

From scratch, the run trains a SentencePiece tokenizer on the train split
(`data.vocab_size`) and builds `config.model`. With `init.model` (an fmjax
workdir or an HF BERT directory) it continues pre-training that model with
its own tokenizer; `config.model` then sets only dropout, dtype and remat,
and `adapt.method` picks full training or an adapter (LoRA, QLoRA, prefix,
prompt) over the frozen model.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import numpy as np

from fmjax import objectives
from fmjax.config import ConfigError
from fmjax.data import documents, sources
from fmjax.data import text as text_data
from fmjax.data.sharded import ShardedIterator
from fmjax.data.tokenizer import (
    MODEL_TYPES,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_for,
)
from fmjax.models.registry import model_config as parse_model_config
from fmjax.tasks import pretrained as pretrained_lib
from fmjax.tasks.base import (
    Task,
    on_process_zero_first,
    validate_data_shards,
    validate_sizes,
)

MODEL_KIND = {"mlm": "encoder", "causal": "decoder"}


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids the MLM objective needs; fmjax's SentencePiece convention
    (pad 0, unk 1, bos 2, eos 3, mask 4) when there is no tokenizer yet."""

    vocab_size: int
    mask_id: int = 4
    special_ids: tuple[int, ...] = (0, 1, 2, 3, 4)

    @classmethod
    def of(cls, tokenizer) -> TokenIds:
        return cls(
            tokenizer.vocab_size, tokenizer.mask_id, tuple(tokenizer.special_ids)
        )


def _prepare(name: str, vocab_size: int, data_dir: str, model_type: str, text_key):
    if name in sources.SHIPPED:
        sources.prepare(name, data_dir)
    if model_type not in MODEL_TYPES:
        return given_tokenizer(model_type)
    try:
        return tokenizer_for(
            name, vocab_size, data_dir, text_key=text_key, model_type=model_type
        )
    except ValueError as e:
        raise ConfigError(
            f"data.vocab_size={vocab_size}, data.tokenizer={model_type!r}: {e}"
        ) from None


def given_tokenizer(path: str):
    """`data.tokenizer` as a path rather than a model type: a SentencePiece
    `.model` file or a directory `load_tokenizer` reads, used as it is (one
    vocabulary shared by several runs, or built for an experiment's symbols)."""
    if os.path.isfile(path):
        try:
            return SentencePieceTokenizer(path)
        except RuntimeError as e:
            raise ConfigError(
                f"data.tokenizer={path!r} is not a SentencePiece model: {e}"
            ) from None
    if os.path.isdir(path):
        try:
            return load_tokenizer(path)
        except FileNotFoundError as e:
            raise ConfigError(f"data.tokenizer={path!r}: {e}") from None
    raise ConfigError(
        f"data.tokenizer={path!r}: expected a SentencePiece model type "
        f"({', '.join(MODEL_TYPES)}) to train on the data, or the path of a "
        "tokenizer file (.model) or directory; no such file or directory"
    )


# What the end of a causal run shows: the first words of a held-out document
# and the model's greedy continuation.
SAMPLE_PROMPT_WORDS = 6
SAMPLE_NEW_TOKENS = 24


class TextTask(Task):
    objectives = ("mlm", "causal")
    throughput_unit = "tokens"

    def __init__(self, config, model_config, *, tokenizer, pretrained, with_data):
        super().__init__(
            config, model_config, tokenizer=tokenizer, pretrained=pretrained
        )
        data = config.data
        self.objective = config.objective.name
        self.mask_rate = config.objective.get("mask_rate", 0.15)
        self.data_name = data.name
        self.data_dir = data.data_dir or sources.default_data_dir()
        self.seq_len = data.seq_len
        self.ids = (
            TokenIds.of(tokenizer)
            if tokenizer is not None
            else TokenIds(model_config.vocab_size)
        )
        if with_data:
            for split in (data.train_split, data.eval_split):
                self._source(split)  # a bad split name fails here, before compute

    @classmethod
    def from_config(cls, config, *, with_data: bool = True) -> TextTask:
        config = copy.deepcopy(config)
        objective = config.objective.name
        kind = MODEL_KIND[objective]
        validate_sizes(config, ("data", "seq_len"), ("data", "vocab_size"))
        if not 0.0 < config.objective.get("mask_rate", 0.15) < 1.0:
            raise ConfigError(
                f"objective.mask_rate={config.objective.mask_rate}: expected in (0, 1)"
            )
        init_path = pretrained_lib.init_model_path(config)
        tokenizer = params = None
        if init_path:
            arch, params, tokenizer = pretrained_lib.load_pretrained(init_path)
            model_config = pretrained_lib.resolve_model_config(
                arch,
                config.model,
                kind=kind,
                settable=pretrained_lib.NUMERICS,
                strict=False,
            )
            config.model = model_config.to_dict()
        else:
            if config.model.get("kind") != kind:
                raise ConfigError(
                    f"model.kind={config.model.get('kind')!r} cannot train objective "
                    f"{objective!r}; it needs model.kind={kind!r}"
                )
            try:
                model_config = parse_model_config(config.model)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model: {e}") from None
        if config.data.seq_len > model_config.max_len:
            raise ConfigError(
                f"data.seq_len={config.data.seq_len} is longer than "
                f"model.max_len={model_config.max_len}"
            )
        if with_data:
            validate_data_shards(config)
            data_dir = config.data.data_dir or sources.default_data_dir()
            try:
                if not documents.is_user_file(config.data.name):
                    sources.check_dataset(config.data.name, data_dir)
            except sources.DatasetNotFoundError as e:
                raise ConfigError(f"data.name={config.data.name!r}: {e}") from None
            model_type = config.data.get("tokenizer", "unigram")
            if tokenizer is None:
                trained = model_type in MODEL_TYPES  # else a given tokenizer
                if trained and config.data.vocab_size > model_config.vocab_size:
                    raise ConfigError(
                        "vocabulary/model size mismatch: data.vocab_size="
                        f"{config.data.vocab_size} tokens but model.vocab_size="
                        f"{model_config.vocab_size} embeddings; set --config.model."
                        f"vocab_size={config.data.vocab_size} (or larger)"
                    )
                name, vocab = config.data.name, config.data.vocab_size
                text_key = config.data.text_key
                tokenizer = on_process_zero_first(
                    lambda: _prepare(name, vocab, data_dir, model_type, text_key)
                )
            elif config.data.name in sources.SHIPPED:
                name = config.data.name
                on_process_zero_first(lambda: sources.prepare(name, data_dir))
            if tokenizer.vocab_size > model_config.vocab_size:
                raise ConfigError(
                    f"vocabulary/model size mismatch: the tokenizer has "
                    f"{tokenizer.vocab_size} tokens, model.vocab_size="
                    f"{model_config.vocab_size}"
                )
        return cls(
            config,
            model_config,
            tokenizer=tokenizer,
            pretrained=params,
            with_data=with_data,
        )

    # --- data ---------------------------------------------------------------------

    def _source(self, split: str):
        try:
            if documents.is_user_file(self.data_name):
                text_key = self.config.data.text_key
                return documents.load_documents(self.data_name, split, text_key)
            return sources.load_source(self.data_name, split, self.data_dir)
        except (
            sources.DatasetNotFoundError,
            FileNotFoundError,
            ValueError,
            KeyError,
        ) as e:
            raise ConfigError(
                f"data split {split!r} of {self.data_name!r}: {e}"
            ) from None

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (rows, self.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, np.int32) for k in text_data.BATCH_KEYS}

    def train_iterator(self) -> ShardedIterator:
        data = self.config.data
        source = self._source(data.train_split)

        def shard(index: int, count: int, rows: int):
            return text_data.make_text_iterator(
                source,
                self.tokenizer,
                batch_size=rows,
                process_index=index,
                process_count=count,
                seq_len=self.seq_len,
                objective=self.objective,
                text_key=data.text_key,
                seed=data.shuffle_seed,
                shuffle=True,
                repeat=True,
            )

        return self.sharded_iterator(shard)

    def eval_iterator(self, split: str | None = None):
        """This process's slice of the eval split, every example once. Processes
        may get different batch counts: the loop pads the short ones."""
        return text_data.make_eval_iterator(
            self._source(split or self.eval_split),
            self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size // jax.process_count(),
            objective=self.objective,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            text_key=self.config.data.text_key,
        )

    def throughput(self, local_batch) -> int:
        return int(np.count_nonzero(local_batch["segment_ids"]))

    def sample(self, context) -> dict:
        """A decoder's greedy continuation of the opening words of the first
        held-out document, or of its prompt (one process only: it reads the
        params on the host)."""
        if self.objective != "causal" or jax.process_count() > 1:
            return {}
        from fmjax.inference.generate import Generator

        source = self._source(self.eval_split)
        if not len(source):
            return {}
        record, text_key = source[0], self.config.data.text_key
        if documents.COMPLETION_KEY in record and text_key not in record:
            prompt = record[documents.PROMPT_KEY]  # what the model learns to answer
        else:
            text = record[text_key]
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            prompt = " ".join(text.split()[:SAMPLE_PROMPT_WORDS])
        params, kwargs = self.adaptation.merged(context.params, context.frozen)
        cfg = self.model_config
        max_len = cfg.max_len if cfg.position == "learned" else None
        generator = Generator(context.model, params, self.tokenizer, kwargs, max_len)
        continuation = generator.generate([prompt], SAMPLE_NEW_TOKENS)[0]
        return {"prompt": prompt, "continuation": continuation}

    # --- loss -----------------------------------------------------------------------

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation
        ids, objective, mask_rate = self.ids, self.objective, self.mask_rate

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            tokens, segment_ids = batch["tokens"], batch["segment_ids"]
            mask_rng, dropout_rng, adapter_rng = jax.random.split(rng, 3)
            extra = {}
            if objective == "mlm":
                inputs, targets, weights = objectives.mlm_mask(
                    mask_rng,
                    tokens,
                    segment_ids,
                    mask_id=ids.mask_id,
                    vocab_size=ids.vocab_size,
                    special_ids=ids.special_ids,
                    rate=mask_rate,
                )
                num = objectives.max_predictions(tokens.shape[1], mask_rate)
                if num < tokens.shape[1]:
                    positions, targets, weights = objectives.gather_predictions(
                        targets, weights, num
                    )
                    extra["predict_positions_BK"] = positions
            else:
                inputs = tokens
                targets, weights = objectives.next_token_targets(
                    tokens, segment_ids, batch.get("loss_mask")
                )
            out = adaptation.apply(
                model,
                params,
                frozen,
                adapter_rng,
                train,
                inputs,
                segment_ids_BL=segment_ids,
                positions_BL=batch["positions"],
                deterministic=not train,
                rngs={"dropout": dropout_rng},
                # The model scores its own head: above model.max_logits_elements
                # it never holds the whole [B, L, V] logits (models/text.py).
                loss_targets=(targets, weights),
                **extra,
            )
            return out["loss_sums"]

        return loss_fn

    def summarize(self, sums) -> dict[str, float]:
        """loss, accuracy and perplexity per predicted token."""
        return {k: float(v) for k, v in objectives.summarize(sums).items()}
