"""Projection heads that self-supervised objectives put on a ViT's pooled
features (`ViTConfig.proj_*`; the features a user keeps are those before it).

    SimCLR:  pooled [B, D] -> Dense(H) -> GELU -> ... -> Dense(proj_dim)   = z
    DINO:    pooled [B, D] -> Dense(H) -> GELU -> ... -> Dense(proj_dim)
             -> L2-normalise -> x @ (V / ||V|| per prototype)            = scores [B, K]

DINO's last layer is weight-normalised with its gain fixed to 1
(`norm_last_layer=True` in the reference), so every prototype is a unit vector
and a score is a cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.dense import EinsumDense
from fmjax.models.layers import activation_fn

if TYPE_CHECKING:
    from fmjax.models.vision import ViTConfig

# The prototypes' param path under the head: DINO freezes it for the first steps.
PROTOTYPES = "prototypes"


class ProjectionHead(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pooled_BD: jax.Array) -> jax.Array:
        cfg = self.config
        numerics = dict(
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, init_std=cfg.init_std
        )
        widths = [cfg.proj_hidden_dim] * (cfg.proj_layers - 1) + [cfg.proj_dim]
        x_BF = pooled_BD
        width_in = cfg.d_model
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            # [embed | hidden, hidden | out]: hidden sharded like an MLP's, a
            # hidden input of a hidden layer whole (one name per dim).
            axis_in = "embed" if i == 0 else ("mlp" if last else "proj")
            axes = (axis_in, "proj" if last else "mlp")
            x_BF = EinsumDense(
                "BF,FG->BG", (width_in, width), axes, name=f"dense_{i}", **numerics
            )(x_BF).astype(jnp.float32)
            if not last:
                x_BF = activation_fn(cfg.activation)(x_BF)
            width_in = width
        if not cfg.prototypes:
            return x_BF
        x_BF = x_BF / jnp.maximum(jnp.linalg.norm(x_BF, axis=-1, keepdims=True), 1e-6)
        v_FK = self.param(
            PROTOTYPES,
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("proj", "prototypes")
            ),
            (cfg.proj_dim, cfg.prototypes),
            cfg.params_dtype,
        ).astype(jnp.float32)
        v_FK = v_FK / jnp.maximum(jnp.linalg.norm(v_FK, axis=0, keepdims=True), 1e-12)
        return jnp.einsum("BF,FK->BK", x_BF, v_FK)
