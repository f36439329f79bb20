"""Masked autoencoder (MAE, He et al. 2021) on the ViT of `fmjax.models.vision`.

    images_BHWC, noise_BP -> random_masking (keep the (1 - mask_ratio)
    lowest-noise patches per example) -> ViT encoder on the kept patches
    -> decoder_embed [B, 1 + K, E] -> mask tokens at the masked positions,
    unshuffled (ids_restore) -> + 2-D sin-cos positions -> decoder Blocks
    -> LayerNorm -> decoder_pred [B, P, X]

Shapes: P patches, K kept, X = patch pixels, E the decoder's width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.dense import EinsumDense
from fmjax.models.layers import LayerNorm
from fmjax.models.vision import (
    VisionTransformer,
    ViTConfig,
    block_class,
    sincos2d_positions,
)

Array = jax.Array


def random_masking(noise_BP: Array, keep: int) -> tuple[Array, Array, Array, Array]:
    """MAE's per-example masking: the `keep` patches with the smallest noise
    stay. Returns (ids_keep [B, K], ids_restore [B, P], mask [B, P]: 1 where
    masked), as the MAE reference's `random_masking`, and ids_masked [B, P -
    K], the other patches. One sort: ids_restore, the inverse permutation
    (each patch's rank), is scattered rather than sorted again, and the mask
    is where that rank is `keep` or more."""
    ids_shuffle_BP = jnp.argsort(noise_BP, axis=1)
    batch, patches = noise_BP.shape
    ranks_BP = jnp.broadcast_to(
        jnp.arange(patches, dtype=ids_shuffle_BP.dtype), (batch, patches)
    )
    rows_B1 = jnp.arange(batch)[:, None]
    ids_restore_BP = (
        jnp.zeros_like(ids_shuffle_BP)
        .at[rows_B1, ids_shuffle_BP]
        .set(ranks_BP, unique_indices=True)
    )
    mask_BP = (ids_restore_BP >= keep).astype(jnp.float32)
    return ids_shuffle_BP[:, :keep], ids_restore_BP, mask_BP, ids_shuffle_BP[:, keep:]


class MaskedAutoencoder(nn.Module):
    """MAE (He et al., 2021): the ViT `encoder` runs on the visible patches
    only; a light decoder gets them back in place with a shared mask token at
    every masked position (`ids_restore`), adds its own 2-D sin-cos
    positions, and predicts every patch's pixels.

    `noise_BP` decides the mask (the lowest (1 - mask_ratio) fraction stay).
    Returns {"pred": [B, P, X], "mask": [B, P] (1 masked), "hidden": the
    encoder's [B, 1 + K, D]}. E below is the decoder's width.

    `masked_only=True` (training: the loss reads the masked patches only):
    "pred" is [B, M, X] at the M masked patches, whose indices are
    "pred_at" [B, M]; the decoder's last layer then computes queries, MLP,
    norm and prediction for those positions only (every position still gives
    keys and values), as `Block(outputs_at_BQ)` does for a ViT's [cls].
    """

    config: ViTConfig

    @nn.compact
    def __call__(
        self,
        images_BHWC: Array,
        *,
        noise_BP: Array,
        mask_ratio: float = 0.75,
        deterministic: bool = True,
        masked_only: bool = False,
    ) -> dict[str, Array]:
        cfg = self.config
        patches = cfg.num_patches
        if noise_BP.shape != (images_BHWC.shape[0], patches):
            raise ValueError(
                f"noise_BP has shape {noise_BP.shape}; expected "
                f"[{images_BHWC.shape[0]}, {patches}]"
            )
        keep = int(patches * (1 - mask_ratio))
        if not 0 < keep < patches:
            raise ValueError(
                f"mask_ratio={mask_ratio} keeps {keep} of {patches} patches; "
                "expected at least one kept and one masked"
            )
        ids_keep_BK, ids_restore_BP, mask_BP, ids_masked_BM = random_masking(
            noise_BP, keep
        )
        encoded = VisionTransformer(cfg.encoder_config(), name="encoder")(
            images_BHWC, keep_BK=ids_keep_BK, deterministic=deterministic
        )
        numerics = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        width = cfg.decoder_d_model
        x_BKE = EinsumDense(
            "BLD,DE->BLE",
            (cfg.d_model, width),
            ("embed", "decoder_embed"),
            init_std=cfg.init_std,
            name="decoder_embed",
            **numerics,
        )(encoded["hidden"]).astype(jnp.float32)
        mask_token_11E = self.param(
            "mask_token",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), (None, None, "decoder_embed")
            ),
            (1, 1, width),
            cfg.params_dtype,
        )
        batch = images_BHWC.shape[0]
        masked_BME = jnp.broadcast_to(
            mask_token_11E.astype(jnp.float32), (batch, patches - keep, width)
        )
        shuffled_BPE = jnp.concatenate([x_BKE[:, 1:], masked_BME], axis=1)
        x_BPE = jnp.take_along_axis(shuffled_BPE, ids_restore_BP[..., None], axis=1)
        x_BPE = x_BPE + jnp.asarray(sincos2d_positions(cfg.grid, width))[None]
        x_BTE = jnp.concatenate([x_BKE[:, :1], x_BPE], axis=1)  # [cls] first
        block_cfg = cfg.block_config(decoder=True)
        mask_B1TT = jnp.ones((batch, 1, patches + 1, patches + 1), bool)
        at_BM = ids_masked_BM + 1 if masked_only else None  # [cls] is token 0
        for i in range(cfg.decoder_layers):
            last = at_BM if i == cfg.decoder_layers - 1 else None
            x_BTE, _ = block_class(block_cfg)(
                block_cfg, pre_norm=True, name=f"decoder_layers_{i}"
            )(x_BTE, mask_B1TT, None, None, deterministic, None, last)
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype)
        x_BTE = LayerNorm(name="decoder_norm", **norm)(x_BTE)
        pred_BTX = EinsumDense(
            "BLE,EX->BLX",
            (width, cfg.patch_dim),
            ("decoder_embed", "patch"),
            init_std=cfg.init_std,
            name="decoder_pred",
            **numerics,
        )(x_BTE)
        out = {"mask": mask_BP, "hidden": encoded["hidden"]}
        if masked_only:
            pred_BMX = pred_BTX.astype(jnp.float32)
            return {**out, "pred": pred_BMX, "pred_at": ids_masked_BM}
        return {**out, "pred": pred_BTX[:, 1:].astype(jnp.float32)}
