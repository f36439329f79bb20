"""`fmjax.load(path)`: a trained model with its tokenizer, for notebooks and scripts.

`path` is an fmjax workdir or export directory, or an HF BERT model directory
(imported with `fmjax.convert.hf.load_hf_bert`, WordPiece tokenizer and the
sentence-transformers pooling of its 1_Pooling/config.json).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.config import ConfigDict
from fmjax.convert import hf
from fmjax.data.tokenizer import load_tokenizer
from fmjax.export import find_export, load_export
from fmjax.models import build_model

POOLINGS = hf.POOLINGS


class Model:
    """A module + params + tokenizer. Inputs are padded with `tokenizer.pad_id`.

    `config.pooling` (default "mean") picks how `embed` pools hidden states:
    "mean" over non-padding tokens, "cls" the first token, "max" per feature.
    """

    def __init__(self, module, params, tokenizer, config: ConfigDict):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.config = config
        self.max_len = config.model.max_len
        self.pooling = config.get("pooling", "mean")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}")

    @functools.cached_property
    def _apply(self):
        def apply(params, tokens_BL):
            segment_ids_BL = (tokens_BL != self.tokenizer.pad_id).astype(jnp.int32)
            positions_BL = jnp.maximum(jnp.cumsum(segment_ids_BL, axis=1) - 1, 0)
            return self.module.apply(
                {"params": params},
                tokens_BL,
                segment_ids_BL=segment_ids_BL,
                positions_BL=positions_BL,
            )

        return jax.jit(apply)

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
        """[bos] text [eos] ([CLS] text [SEP] for WordPiece), truncated to max_len,
        right-padded to the longest."""
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
        non-padding tokens as `self.pooling` says (mean by default)."""
        if isinstance(texts, str):
            raise TypeError("embed expects a list of strings, got one string")
        out = []
        for start in range(0, len(texts), batch_size):
            ids = self.encode_batch(list(texts[start : start + batch_size]))
            out.append(self._pool(self.hidden(ids), ids != self.tokenizer.pad_id))
        if not out:
            return np.zeros((0, self.module.config.d_model), np.float32)
        return np.concatenate(out).astype(np.float32)

    def _pool(self, hidden_BLD: np.ndarray, real_BL: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden_BLD[:, 0]
        mask_BL1 = real_BL[..., None]
        if self.pooling == "max":
            return np.where(mask_BL1, hidden_BLD, -np.inf).max(axis=1)
        mask_BL1 = mask_BL1.astype(np.float32)
        return (hidden_BLD * mask_BL1).sum(1) / np.maximum(mask_BL1.sum(1), 1.0)


def load(path: str) -> Model:
    """Loads an fmjax workdir, its export directory, or an HF BERT directory."""
    if hf.is_hf_directory(path):
        model_config, params, tokenizer = hf.load_hf_bert(path)
        config = ConfigDict(
            {"name": "hf_import", "model": model_config, "pooling": hf.hf_pooling(path)}
        )
    else:
        params, config = load_export(path)
        config = ConfigDict(config)
        tokenizer = load_tokenizer(find_export(path))
    module = build_model(config.model)
    params = jax.tree.map(jnp.asarray, params)
    return Model(module, params, tokenizer, config)
