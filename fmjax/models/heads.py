"""Task heads that read an encoder's hidden states.

The MLM head lives in `TextEncoder` (it is tied to the token embeddings); the
classifier head is here. Its params sit beside the encoder's, under
`classifier/{kernel, bias}`, so an imported HF encoder's param tree is the
classifier's minus the head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.config import CLASSIFIER_POOLINGS, TransformerConfig
from fmjax.models.dense import EinsumDense

Array = jax.Array


def pool(hidden_BLD: Array, segment_ids_BL: Array, pooling: str) -> Array:
    """[B, D] f32: the mean over non-padding tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden_BLD[:, 0].astype(jnp.float32)
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r}: expected one of {CLASSIFIER_POOLINGS}")
    real_BL1 = (segment_ids_BL > 0).astype(jnp.float32)[..., None]
    total_BD = jnp.sum(hidden_BLD.astype(jnp.float32) * real_BL1, axis=1)
    return total_BD / jnp.maximum(jnp.sum(real_BL1, axis=1), 1.0)


def classifier_logits(
    cfg: TransformerConfig,
    hidden_BLD: Array,
    segment_ids_BL: Array,
    deterministic: bool,
) -> Array:
    """Pooled hidden state -> dropout -> dense -> [B, N] f32 class logits.

    Call it inside a compact module's `__call__`: the dense layer becomes that
    module's `classifier` submodule (no extra nesting level).
    """
    pooled_BD = pool(hidden_BLD, segment_ids_BL, cfg.classifier_pooling)
    pooled_BD = nn.Dropout(cfg.dropout_rate)(pooled_BD, deterministic=deterministic)
    logits_BN = EinsumDense(
        "BD,DN->BN",
        (cfg.d_model, cfg.num_classes),
        ("embed", "classes"),
        init_std=cfg.init_std,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        name="classifier",
    )(pooled_BD)
    return nn.with_logical_constraint(
        logits_BN.astype(jnp.float32), ("batch", "classes")
    )
