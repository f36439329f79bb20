"""DualEncoder: an image tower and a text tower meeting in one embedding space
(CLIP, SigLIP, LiT).

    images_BHWC -> ViT (fmjax.models.vision) -> pooled [B, D_img]
                -> image_proj [D_img, E] -> L2-normalise -> image_embed [B, E]
    tokens_BL   -> text tower -> hidden [B, L, D_txt] -> pool (`text_pool`)
                -> text_proj [D_txt, E] -> L2-normalise -> text_embed [B, E]
    logit_scale (log of the inverse temperature) and, for SigLIP, logit_bias:
    logits = exp(logit_scale) * image_embed @ text_embed.T (+ logit_bias)

The text tower is any fmjax text model: a TextEncoder (BERT family, e.g. the
imported all-MiniLM-L6-v2; built without its MLM head) or a TextDecoder (GPT
family: token and learned positions, causal pre-LN blocks and a final norm,
which with `quick_gelu` is exactly CLIP's text transformer; its LM logits are
never used, so XLA never computes them). `text_pool`: "last" real token
(CLIP's EOS token, the end of a causal tower's text), "mean" over real tokens
(sentence-transformers), or "cls" (the first token). Real tokens are those
with a nonzero segment id; padding goes on the right.

Shapes: E the joint embedding width (`embed_dim`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.config import TransformerConfig
from fmjax.models.dense import EinsumDense
from fmjax.models.layers import take_rows
from fmjax.models.vision import ViTConfig

Array = jax.Array

TEXT_POOLS = ("last", "mean", "cls")
# CLIP's initial temperature 0.07 and SigLIP's initial scale 10 and bias -10.
CLIP_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE = math.log(10.0)
SIGLIP_LOGIT_BIAS = -10.0


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """Shape of a dual encoder (kind "dual_encoder"); checked when built.
    `logit_bias_init` None: no bias param (CLIP's softmax loss needs none)."""

    image: ViTConfig
    text: TransformerConfig
    embed_dim: int = 128
    text_pool: str = "last"
    logit_scale_init: float = CLIP_LOGIT_SCALE
    logit_bias_init: float | None = None
    kind: str = "dual_encoder"

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok:
                raise ValueError(
                    f"DualEncoderConfig.{name}={getattr(self, name)!r}: "
                    f"expected {expected}"
                )

        check("kind", self.kind == "dual_encoder", "'dual_encoder'")
        check("image", isinstance(self.image, ViTConfig), "a ViTConfig")
        check("text", isinstance(self.text, TransformerConfig), "a TransformerConfig")
        check(
            "embed_dim",
            isinstance(self.embed_dim, int) and self.embed_dim > 0,
            "a positive int",
        )
        check("text_pool", self.text_pool in TEXT_POOLS, f"one of {TEXT_POOLS}")
        if self.image.kind != "vit" or self.image.num_classes or self.image.proj_layers:
            raise ValueError(
                "DualEncoderConfig.image: expected a plain ViT (kind 'vit', no "
                "classifier or projection head); got "
                f"kind={self.image.kind!r}, num_classes={self.image.num_classes}, "
                f"proj_layers={self.image.proj_layers}"
            )
        if self.text.kind == "encoder" and (
            self.text.mlm_head or self.text.num_classes
        ):
            raise ValueError(
                "DualEncoderConfig.text: an encoder tower has no MLM or classifier "
                f"head (set mlm_head=False, num_classes=0; got mlm_head="
                f"{self.text.mlm_head}, num_classes={self.text.num_classes})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DualEncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"DualEncoderConfig: unknown keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        fields = dict(d)
        for name in ("image", "text"):
            if name not in fields:
                raise ValueError(f"DualEncoderConfig: no {name!r} tower config")
        image, text = fields["image"], fields["text"]
        if not isinstance(image, ViTConfig):
            image = ViTConfig.from_dict({"kind": "vit", **dict(image)})
        if not isinstance(text, TransformerConfig):
            text = TransformerConfig.from_dict(dict(text))
        return cls(**{**fields, "image": image, "text": text})

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "image": self.image.to_dict(),
            "text": self.text.to_dict(),
        }


def _text_tower(cfg: TransformerConfig, name: str) -> nn.Module:
    from fmjax.models.text import TextDecoder, TextEncoder

    module = TextDecoder if cfg.kind == "decoder" else TextEncoder
    return module(cfg, name=name)


def pool_positions(segment_ids_BL: Array, pool: str) -> Array:
    """[B] int32: the token a "cls" (first) or "last" (last real) pool reads."""
    if pool == "cls":
        return jnp.zeros(segment_ids_BL.shape[:1], jnp.int32)
    real_B = (segment_ids_BL > 0).sum(axis=1).astype(jnp.int32)
    return jnp.maximum(real_B - 1, 0)


def pool_text(hidden_BLD: Array, segment_ids_BL: Array, pool: str) -> Array:
    """[B, D] from a text tower's hidden states (float32)."""
    hidden_BLD = hidden_BLD.astype(jnp.float32)
    if pool == "mean":
        real_BL = (segment_ids_BL > 0).astype(jnp.float32)
        total_BD = jnp.einsum("BLD,BL->BD", hidden_BLD, real_BL)
        return total_BD / jnp.maximum(real_BL.sum(axis=1, keepdims=True), 1.0)
    return take_rows(hidden_BLD, pool_positions(segment_ids_BL, pool)[:, None])[:, 0]


def normalise(x_BE: Array) -> Array:
    norm_B1 = jnp.linalg.norm(x_BE, axis=-1, keepdims=True)
    return x_BE / jnp.maximum(norm_B1, 1e-12)


class DualEncoder(nn.Module):
    """Returns {"image_embed": [B, E], "text_embed": [B', E] (unit vectors,
    float32), "logit_scale": scalar, and "logit_bias" when the config has one}.
    `encode_images` / `encode_texts` run one tower (`apply(..., method=)`)."""

    config: DualEncoderConfig

    def setup(self):
        cfg = self.config
        from fmjax.models.vision import VisionTransformer

        self.image = VisionTransformer(cfg.image)
        self.text = _text_tower(cfg.text, "text")

        def projection(width):
            return EinsumDense(
                "BD,DE->BE",
                (width, cfg.embed_dim),
                ("embed", "proj"),
                use_bias=False,
                init_std=width**-0.5,
                dtype=cfg.image.compute_dtype,
                param_dtype=cfg.image.params_dtype,
            )

        self.image_proj = projection(cfg.image.d_model)
        self.text_proj = projection(cfg.text.d_model)
        scalar = lambda value: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.constant(value), ()
        )
        self.logit_scale = self.param(
            "logit_scale", scalar(cfg.logit_scale_init), (), jnp.float32
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", scalar(cfg.logit_bias_init), (), jnp.float32
            )

    def encode_images(self, images_BHWC: Array, deterministic: bool = True) -> Array:
        pooled_BD = self.image(
            images_BHWC, deterministic=deterministic, pooled_only=True
        )["pooled"]
        return normalise(self.image_proj(pooled_BD).astype(jnp.float32))

    def encode_texts(
        self, tokens_BL: Array, segment_ids_BL: Array, deterministic: bool = True
    ) -> Array:
        pool = self.config.text_pool
        if self.config.text.kind == "decoder" and pool in ("last", "cls"):
            # The tower's last layer computes the pooled token alone.
            at_B1 = pool_positions(segment_ids_BL, pool)[:, None]
            hidden_B1D = self.text(
                tokens_BL,
                segment_ids_BL=segment_ids_BL,
                deterministic=deterministic,
                select_BK=at_B1,
            )["hidden"]
            pooled_BD = hidden_B1D[:, 0].astype(jnp.float32)
        else:
            hidden_BLD = self.text(
                tokens_BL, segment_ids_BL=segment_ids_BL, deterministic=deterministic
            )["hidden"]
            pooled_BD = pool_text(hidden_BLD, segment_ids_BL, pool)
        return normalise(self.text_proj(pooled_BD).astype(jnp.float32))

    def __call__(
        self,
        images_BHWC: Array,
        tokens_BL: Array,
        segment_ids_BL: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(tokens_BL)
        out = {
            "image_embed": self.encode_images(images_BHWC, deterministic),
            "text_embed": self.encode_texts(tokens_BL, segment_ids_BL, deterministic),
            "logit_scale": self.logit_scale,
        }
        if self.config.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out
