"""Image-text dual encoders (`clip`, configs/clip.py): CLIP's softmax loss
(`objective.loss=softmax`) or SigLIP's sigmoid loss (`sigmoid`), LiT by
locking a tower.

Data: image-caption pairs. `emoji_captions` ships (Noto Color Emoji pictures
and their names); `csv:FILE` / `jsonl:FILE` read a user's pairs
(`data.image_key`, `data.caption_key`); any TFDS dataset with `image` and
`captions` / `data.caption_key` features plugs in by name; a class-labelled
image dataset (`fashion_mnist`) trains on captions made from its label names
(`data.captions=labels`, templates in `fmjax.data.captions`), optionally on
`data.classes` only (zero-shot transfer to the others). A training example
draws one of its image's captions; eval reads the first.

Towers: `model.image` (a ViT) and `model.text` (a causal CLIP-style tower by
default). `init.text` starts the text tower from a pretrained text model (an
HF BERT directory such as all-MiniLM-L6-v2, or an fmjax export; its
tokenizer comes along), `init.image` the image tower from an fmjax ViT or MAE
export, `init.model` everything from a dual encoder (an fmjax run or an HF
CLIP directory). LiT locks a tower: `adapt.freeze=("text/.*",)`; LoRA on the
text tower with the image tower trained: `adapt.method=lora`,
`adapt.lora_targets=("text/.*/(query|value)/kernel",)`,
`adapt.train_patterns=("image/.*", "image_proj/.*", "text_proj/.*",
"logit_scale", "logit_bias")`.

The temperature is learned in log space (`logit_scale`), clamped to at most
`objective.max_logit_scale` (ln 100) after every update and, as a scalar,
never weight-decayed. With a mesh that splits the batch, the losses run per
device (`objective.per_device`): InfoNCE of each device's rows against all
devices' columns, and SigLIP's chunked ring, so no device holds B x B logits.
"""

from __future__ import annotations

import copy
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import objectives
from fmjax.config import ConfigError
from fmjax.convert import sentence_transformers
from fmjax.data import captions as caption_lib
from fmjax.data import images as image_data
from fmjax.data import sources
from fmjax.models import multimodal
from fmjax.models.registry import model_config as parse_model_config
from fmjax.tasks import pretrained as pretrained_lib
from fmjax.tasks.base import (
    Task,
    on_process_zero_first,
    validate_data_shards,
    validate_sizes,
)
from fmjax.tasks.image_text_eval import RetrievalEvaluator, ZeroShotEvaluator

LOSSES = ("softmax", "sigmoid")
PARTS = ("image", "text", "image_proj", "text_proj", "logit_scale", "logit_bias")
PAIR_PREFIXES = ("csv:", "jsonl:")


def _init_path(config, key: str) -> str:
    path = os.path.expanduser(config.init.get(key, "") or "")
    return sentence_transformers.resolve(path)


def _columns(config) -> dict:
    name = config.data.name
    if name.startswith(PAIR_PREFIXES):
        return {"columns": (config.data.image_key, config.data.caption_key)}
    return {}


def _filtered(source, classes):
    """The records of `source` whose label is in `classes` (a list view)."""
    if not classes:
        return source
    keep = set(int(c) for c in classes)
    indices = [i for i in range(len(source)) if int(source[i]["label"]) in keep]
    return _Subset(source, indices)


class _Subset:
    def __init__(self, source, indices):
        self._source, self._indices = source, indices

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, index):
        return self._source[self._indices[index]]


class ImageTextTask(Task):
    objectives = ("clip",)
    throughput_unit = "pairs"

    def __init__(self, config, model_config, *, tokenizer, pretrained, label_names):
        super().__init__(
            config, model_config, tokenizer=tokenizer, pretrained=pretrained
        )
        if self.adaptation.method in ("prefix", "prompt"):
            raise ConfigError(
                f"adapt.method={self.adaptation.method!r}: a dual encoder adapts "
                "with full (adapt.freeze locks a tower), lora or qlora"
            )
        data = config.data
        self.data_name = data.name
        self.data_dir = data.data_dir or sources.default_data_dir()
        self.train_split = data.train_split
        self.text_len = data.text_len
        self.label_names = tuple(label_names)
        self.from_labels = data.captions == "labels"
        self._sources = {}
        # The parts init.* did not provide start from random weights.
        present = set(pretrained or {})
        self.new_param_prefixes = tuple(
            key if key.startswith("logit_") else f"{key}/"
            for key in PARTS
            if key not in present
        )

    # --- config -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, *, with_data: bool = True) -> ImageTextTask:
        config = copy.deepcopy(config)
        validate_sizes(config, ("data", "text_len"))
        objective = config.objective
        if objective.loss not in LOSSES:
            raise ConfigError(
                f"objective.loss={objective.loss!r}: expected one of {LOSSES}"
            )
        if config.model.get("kind") != "dual_encoder":
            raise ConfigError(
                f"model.kind={config.model.get('kind')!r}: clip trains "
                "model.kind='dual_encoder'"
            )
        if config.data.captions not in ("record", "labels"):
            raise ConfigError(
                f"data.captions={config.data.captions!r}: expected 'record' (the "
                "data's captions) or 'labels' (captions from label names)"
            )
        names = ()
        if with_data:
            validate_data_shards(config)
            names = _check_data(config)
        model_dict, tokenizer, pretrained = _resolve_model(config, with_data)
        config.model.update(
            {k: v for k, v in model_dict.items() if k not in ("image", "text")}
        )
        config.model.image.update(model_dict["image"])
        config.model.text.update(model_dict["text"])
        try:
            model_config = parse_model_config(model_dict)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        channels = model_config.image.channels
        for key in ("mean", "std"):
            if len(config.data[key]) not in (1, channels):
                raise ConfigError(
                    f"data.{key}={tuple(config.data[key])}: expected 1 or {channels} "
                    f"values for the image tower's {channels} channels"
                )
        if config.data.text_len > model_config.text.max_len:
            raise ConfigError(
                f"data.text_len={config.data.text_len} exceeds the text tower's "
                f"max_len={model_config.text.max_len}"
            )
        return cls(
            config, model_config, tokenizer=tokenizer, pretrained=pretrained,
            label_names=names,
        )  # fmt: skip

    # --- data ---------------------------------------------------------------------

    def _source(self, split: str):
        if split not in self._sources:
            try:
                source = sources.load_source(
                    self.data_name, split, self.data_dir, **_columns(self.config)
                )
            except ValueError as e:
                raise ConfigError(
                    f"data split {split!r} of {self.data_name!r}: {e}"
                ) from None
            if split == self.train_split:
                source = _filtered(source, tuple(self.config.data.classes))
            self._sources[split] = source
        return self._sources[split]

    def caption_tokens(self, draw: bool) -> caption_lib.CaptionTokens:
        data = self.config.data
        return caption_lib.CaptionTokens(
            self.tokenizer,
            self.text_len,
            caption_key=data.caption_key,
            draw=draw,
            label_names=self.label_names if self.from_labels else (),
            templates=tuple(data.templates) or caption_lib.LABEL_TEMPLATES,
        )

    def pipeline(self, **kwargs) -> dict:
        data, image = self.config.data, self.model_config.image
        return dict(
            image_size=image.image_size,
            channels=image.channels,
            mean=tuple(data.mean),
            std=tuple(data.std),
            **kwargs,
        )

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        image = self.model_config.image
        shape = (rows, image.image_size, image.image_size, image.channels)
        return {
            "images": jax.ShapeDtypeStruct(shape, np.float32),
            "tokens": jax.ShapeDtypeStruct((rows, self.text_len), np.int32),
            "segment_ids": jax.ShapeDtypeStruct((rows, self.text_len), np.int32),
            "labels": jax.ShapeDtypeStruct((rows,), np.int32),
            "weights": jax.ShapeDtypeStruct((rows,), np.float32),
        }

    def train_iterator(self):
        source = self._source(self.train_split)
        data = self.config.data

        def shard(index: int, count: int, rows: int):
            return image_data.make_image_iterator(
                source,
                **self.pipeline(
                    batch_size=rows,
                    seed=data.shuffle_seed,
                    augment=tuple(data.get("augment", ())),
                    text_fn=self.caption_tokens(draw=True),
                    process_index=index,
                    process_count=count,
                ),
            )

        return self.sharded_iterator(shard)

    def eval_iterator(self, split: str | None = None):
        return image_data.make_image_iterator(
            self._source(split or self.eval_split),
            **self.pipeline(
                batch_size=self.batch_size // jax.process_count(),
                seed=0,
                shuffle=False,
                repeat=False,
                drop_remainder=False,
                text_fn=self.caption_tokens(draw=False),
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ),
        )

    def throughput(self, local_batch) -> int:
        return int(np.count_nonzero(local_batch["weights"]))

    def summary(self) -> dict:
        return {"train_examples": len(self._source(self.train_split))}

    # --- loss ---------------------------------------------------------------------

    def loss_fn(self, model, adaptation=None):
        adaptation = adaptation or self.adaptation
        objective = self.config.objective
        sigmoid = objective.loss == "sigmoid"
        per_device = objective.per_device

        def loss_fn(params, frozen, batch, rng, train: bool, extra) -> dict:
            del extra  # no state beside the params
            dropout_rng, adapter_rng = jax.random.split(rng)
            out = adaptation.apply(
                model, params, frozen, adapter_rng, train,
                batch["images"], batch["tokens"], batch["segment_ids"],
                deterministic=not train, rngs={"dropout": dropout_rng},
            )  # fmt: skip
            args = (out["image_embed"], out["text_embed"], out["logit_scale"])
            if sigmoid:
                fn = (
                    objectives.sigmoid_sums_chunked
                    if per_device
                    else objectives.sigmoid_sums
                )
                return fn(*args, out["logit_bias"], batch["weights"])
            fn = (
                objectives.infonce_sums_gathered
                if per_device
                else objectives.infonce_sums
            )
            return fn(*args, batch["weights"])

        return loss_fn

    def export(self, workdir: str, trained_params, frozen_params=None) -> str:
        """The whole dual encoder, adapters folded in: its towers come from
        up to three places (init.text, init.image, init.model), so an
        adapter-only export would have no one base to load over."""
        from fmjax.export import MODEL_WEIGHTS, export

        params, _ = self.adaptation.merged(trained_params, frozen_params or {})
        config = copy.deepcopy(self.config)
        config.adapt.method = "full"  # what the export holds
        return export(workdir, params, config, self.tokenizer, weights=MODEL_WEIGHTS)

    def constrain_params(self, params):
        """`logit_scale` clamped to [0, objective.max_logit_scale] (CLIP's
        clamp of the learned temperature to at most 100)."""
        high = self.config.objective.max_logit_scale

        def clamp(path, p):
            if getattr(path[-1], "key", None) == "logit_scale":
                return jnp.clip(p, 0.0, high)
            return p

        return jax.tree_util.tree_map_with_path(clamp, params)

    def summarize(self, sums) -> dict[str, float]:
        count = max(float(sums["count"]), 1e-8)
        return {
            "loss": float(sums["loss_sum"]) / count,
            # How often a pair's own partner scores highest in its batch.
            "i2t_accuracy": float(sums["correct_i2t"]) / count,
            "t2i_accuracy": float(sums["correct_t2i"]) / count,
            "count": float(sums["count"]),
        }

    @property
    def evaluators(self) -> tuple:
        out = []
        if self.config.retrieval.evaluate and not self.from_labels:
            out.append(RetrievalEvaluator())
        # Zero-shot needs class names: the data's when its captions are made
        # from them, or zero_shot.class_names.
        if self.config.zero_shot.evaluate and (
            self.from_labels or self.config.zero_shot.class_names
        ):
            out.append(ZeroShotEvaluator())
        return tuple(out)


def _check_data(config) -> tuple[str, ...]:
    """Checks the dataset's features; returns its label names (or ())."""
    data = config.data
    data_dir = data.data_dir or sources.default_data_dir()
    try:
        sources.check_dataset(data.name, data_dir, **_columns(config))
        if data.name in sources.SHIPPED:
            on_process_zero_first(lambda: sources.prepare(data.name, data_dir))
        features = sources.dataset_info(
            data.name, data_dir, **_columns(config)
        ).features
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.name={data.name!r}: {e}") from None
    if "image" not in features:
        raise ConfigError(
            f"data.name={data.name!r} has features {sorted(features)}; image-text "
            "training reads an 'image' feature"
        )
    label = features["label"] if "label" in features else None
    names = tuple(label.names) if label is not None and hasattr(label, "names") else ()
    if data.captions == "labels":
        if not names:
            raise ConfigError(
                f"data.captions='labels' but data.name={data.name!r} has no class "
                f"label feature (features: {sorted(features)})"
            )
    elif "captions" not in features and data.caption_key not in features:
        raise ConfigError(
            f"data.name={data.name!r} has no captions (features: "
            f"{sorted(features)}); expected 'captions' or data.caption_key="
            f"{data.caption_key!r}, or data.captions='labels' for a labelled dataset"
        )
    bad = [c for c in data.classes if not 0 <= int(c) < max(len(names), 1)]
    if bad or (data.classes and not names):
        raise ConfigError(
            f"data.classes={tuple(data.classes)}: expected label ids of "
            f"{data.name!r} ({len(names)} classes)"
        )
    return names


def _caption_tokenizer(config):
    """A SentencePiece model trained on the train split's captions (cached by
    dataset, split, classes and vocabulary size)."""
    from fmjax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    data = config.data
    data_dir = data.data_dir or sources.default_data_dir()
    key = f"{data.name}|{data.train_split}|{data.captions}|{tuple(data.classes)}"
    digest = hashlib.md5(key.encode()).hexdigest()[:12]
    path = os.path.join(
        data_dir, "caption_tokenizers", f"{digest}_{data.vocab_size}.model"
    )
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)

    def build():
        if os.path.isfile(path):
            return SentencePieceTokenizer(path)
        source = sources.load_source(
            data.name, data.train_split, data_dir, **_columns(config)
        )
        source = _filtered(source, tuple(data.classes))
        if data.captions == "labels":
            names = _check_data(config)
            templates = tuple(data.templates) or caption_lib.LABEL_TEMPLATES
            texts = [t for n in names for t in caption_lib.label_captions(n, templates)]
        else:
            texts = [
                t for i in range(len(source))
                for t in caption_lib.captions_of(source[i], data.caption_key)
            ]  # fmt: skip
        try:
            # A caption corpus is small: vocab_size is an upper bound.
            return train_sentencepiece(
                texts, data.vocab_size, path, hard_vocab_limit=False
            )
        except ValueError as e:
            raise ConfigError(f"data.vocab_size={data.vocab_size}: {e}") from None

    return on_process_zero_first(build)


def _resolve_model(config, with_data: bool):
    """(model config dict, tokenizer, pretrained params or None)."""
    model = {k: v for k, v in config.model.items() if k not in ("image", "text")}
    image, text = dict(config.model.image), dict(config.model.text)
    sigmoid = config.objective.loss == "sigmoid"
    if model.get("logit_scale_init") is None:
        model["logit_scale_init"] = (
            multimodal.SIGLIP_LOGIT_SCALE if sigmoid else multimodal.CLIP_LOGIT_SCALE
        )
    if model.get("logit_bias_init") is None and sigmoid:
        model["logit_bias_init"] = multimodal.SIGLIP_LOGIT_BIAS
    if not sigmoid:
        model["logit_bias_init"] = None
    pretrained, tokenizer = {}, None
    whole = _init_path(config, "model")
    if whole:
        arch, params, tokenizer = pretrained_lib.load_pretrained(whole)
        if arch.get("kind") != "dual_encoder":
            raise ConfigError(
                f"init.model is a {arch.get('kind')!r} model; clip starts from a "
                "dual encoder (use init.text / init.image for one tower)"
            )
        image.update(arch["image"])
        text.update(arch["text"])
        model.update(embed_dim=arch["embed_dim"], text_pool=arch["text_pool"])
        pretrained = dict(params)
    text_path = _init_path(config, "text")
    if text_path:
        arch, params, tokenizer = pretrained_lib.load_pretrained(text_path)
        if arch.get("kind") not in ("encoder", "decoder"):
            raise ConfigError(
                f"init.text is a {arch.get('kind')!r} model; expected a text model"
            )
        numerics = {k: text[k] for k in pretrained_lib.NUMERICS if k in text}
        text = {**arch, "mlm_head": False, "num_classes": 0, **numerics}
        pretrained["text"] = {
            k: v for k, v in params.items() if not k.startswith("mlm_")
        }
    image_path = _init_path(config, "image")
    if image_path:
        arch, params, _ = _load_image_tower(image_path)
        image = {**image, **arch}
        pretrained["image"] = params
    if tokenizer is None and with_data:
        tokenizer = _caption_tokenizer(config)
    if tokenizer is not None and not text_path and not whole:
        text["vocab_size"] = tokenizer.vocab_size
    if model.get("text_pool", "auto") == "auto":
        # CLIP pools a causal tower's EOS; sentence encoders average tokens.
        model["text_pool"] = "last" if text.get("kind") == "decoder" else "mean"
    model.update(image={**image, "kind": "vit"}, text=text)
    return model, tokenizer, (pretrained or None)


def _load_image_tower(path: str):
    """(ViT config dict, params, None) of an fmjax ViT or MAE run / export or
    an HF ViT / ViTMAE directory; heads dropped."""
    arch, params, _ = pretrained_lib.load_pretrained(path)
    if arch.get("kind") == "vit_mae":
        params = params["encoder"]
        arch = parse_model_config(arch).encoder_config().to_dict()
    if arch.get("kind") != "vit":
        raise ConfigError(f"init.image is a {arch.get('kind')!r} model; expected a ViT")
    arch = parse_model_config(arch).to_dict()  # every field: the tower is its shape
    heads = ("classifier", "projection")
    params = {k: v for k, v in params.items() if k not in heads}
    arch.update(num_classes=0, proj_layers=0)
    return arch, params, None
