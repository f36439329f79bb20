"""Vision Transformer (ViT): patches -> the text models' pre-LN Block -> readout.

    images_BHWC (float, normalised) -> patchify (einops) -> linear embed [B,P,D]
    -> + positions (2-D sin-cos, fixed; or learned) -> [cls] token if pooled by
    it -> Blocks (the same `layers.Block` as GPT, no mask: every patch sees every
    patch) -> final LayerNorm -> readout: "cls" token, "mean" of the patches or
    "map" (multihead attention pooling with a learned probe, as big_vision's
    MAPHead) -> optional classifier.

`keep_BK` (MAE, `fmjax.models.mae`): indices of the K patches each row
keeps; the encoder embeds all patches, adds their positions, then runs only
the kept ones (the MAE encoder never sees masked patches). Shapes: P
patches, X = patch pixels (patch * patch * channels), N classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models.attention import attend_values, attention_probs
from fmjax.models.config import ACTIVATIONS, DTYPES, REMAT, TransformerConfig
from fmjax.models.dense import EinsumDense
from fmjax.models.layers import LayerNorm, activation_fn
from fmjax.models.projection import ProjectionHead

Array = jax.Array

VIT_KINDS = ("vit", "vit_mae")
VIT_POSITIONS = ("sincos2d", "learned")
VIT_POOLS = ("cls", "mean", "map")
VIT_PATCH_INITS = ("xavier", "normal")
DECODER_FIELDS = (
    "decoder_d_model", "decoder_layers", "decoder_heads", "decoder_head_dim",
    "decoder_mlp_dim",
)  # fmt: skip
_POSITIVE_INTS = (
    "image_size patch_size channels d_model num_layers num_heads head_dim mlp_dim"
).split()


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape and numerics of a ViT (kind "vit"); checked when built."""

    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 128
    position: str = "sincos2d"
    pool: str = "cls"
    num_classes: int = 0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    # The patch embedding's kernel at init. "xavier": normal with variance
    # 2 / (patch_dim + d_model), MAE's scale (big_vision's lecun_normal is of
    # its order); tokens then vary from image to image as much as 2-D sin-cos
    # positions vary from patch to patch, even for 4x4x1 patches. "normal":
    # init_std like every other kernel, as HF's ViT and CLIP; with 16 inputs
    # a token is then a tenth image and the rest position, a fresh ViT gives
    # nearly one vector for every image, and DINO's centred teacher went
    # uniform within 20 steps (docs/vision.md).
    patch_init: str = "xavier"
    remat: str = "none"
    # A LayerNorm over the tokens before the first block (CLIP's
    # `pre_layrnorm`; timm's `norm_pre`).
    pre_norm: bool = False
    # kind "vit_mae" (MaskedAutoencoder): the light decoder's shape.
    decoder_d_model: int = 0
    decoder_layers: int = 1
    decoder_heads: int = 4
    decoder_head_dim: int = 32
    decoder_mlp_dim: int = 512
    # A projection head on the pooled features (self-supervised objectives;
    # `fmjax.models.projection`): proj_layers Dense layers (0: none) of width
    # proj_hidden_dim, the last to proj_dim; with prototypes > 0 (DINO) the
    # L2-normalised output is scored against that many weight-normalised
    # prototypes.
    proj_layers: int = 0
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    prototypes: int = 0
    kind: str = "vit"

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok:
                raise ValueError(
                    f"ViTConfig.{name}={getattr(self, name)!r}: expected {expected}"
                )

        check("kind", self.kind in VIT_KINDS, f"one of {VIT_KINDS}")
        if self.kind == "vit_mae":
            for name in ("decoder_d_model", "decoder_layers", "decoder_heads",
                         "decoder_head_dim", "decoder_mlp_dim"):  # fmt: skip
                value = getattr(self, name)
                check(name, isinstance(value, int) and value > 0, "a positive int")
            check("pool", self.pool == "cls", "'cls' (MAE's encoder keeps [cls])")
            check("position", self.position == "sincos2d", "'sincos2d' (MAE)")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            check(name, isinstance(value, int) and value > 0, "a positive int")
        check(
            "patch_size",
            self.image_size % self.patch_size == 0,
            f"a divisor of image_size={self.image_size}",
        )
        check("position", self.position in VIT_POSITIONS, f"one of {VIT_POSITIONS}")
        check("pool", self.pool in VIT_POOLS, f"one of {VIT_POOLS}")
        check(
            "patch_init",
            self.patch_init in VIT_PATCH_INITS,
            f"one of {VIT_PATCH_INITS}",
        )
        check("num_classes", self.num_classes >= 0, "0 (no head) or a positive int")
        check("proj_layers", self.proj_layers >= 0, "0 (no head) or a positive int")
        check("prototypes", self.prototypes >= 0, "0 (no prototypes) or positive")
        if self.proj_layers:
            for name in ("proj_hidden_dim", "proj_dim"):
                check(name, getattr(self, name) > 0, "a positive int")
        check("activation", self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}")
        for name in ("dtype", "param_dtype"):
            check(name, getattr(self, name) in DTYPES, f"one of {DTYPES}")
        check("remat", self.remat in REMAT, f"one of {REMAT}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            check(name, 0.0 <= getattr(self, name) < 1.0, "a rate in [0, 1)")
        if self.position == "sincos2d":
            check("d_model", self.d_model % 4 == 0, "a multiple of 4 (2-D sin-cos)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"ViTConfig: unknown keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def encoder_config(self) -> ViTConfig:
        """The ViT a MAE trains: its encoder alone (kind "vit")."""
        decoder = {f: getattr(ViTConfig, f) for f in DECODER_FIELDS}
        return dataclasses.replace(self, kind="vit", **decoder)

    def block_config(self, decoder: bool = False) -> TransformerConfig:
        """The TransformerConfig the shared Block reads (its text-only fields
        are placeholders: a ViT has no vocabulary); the MAE decoder's with
        `decoder`."""
        shape = dict(
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
        )
        if decoder:
            shape = dict(
                d_model=self.decoder_d_model,
                num_layers=self.decoder_layers,
                num_heads=self.decoder_heads,
                head_dim=self.decoder_head_dim,
                mlp_dim=self.decoder_mlp_dim,
            )
        return TransformerConfig(
            kind="encoder",
            vocab_size=1,
            **shape,
            max_len=self.num_patches + 1,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            layer_norm_eps=self.layer_norm_eps,
            activation=self.activation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            remat=self.remat,
        )


def patchify(images_BHWC: Array, patch: int) -> Array:
    """[B, P, X]: non-overlapping patch x patch squares in row-major order, each
    flattened (row, column, channel)."""
    return einops.rearrange(
        images_BHWC, "B (h p) (w q) C -> B (h w) (p q C)", p=patch, q=patch
    )


def unpatchify(patches_BPX: Array, patch: int, channels: int) -> Array:
    """Inverse of `patchify` for square images."""
    grid = int(round(patches_BPX.shape[1] ** 0.5))
    return einops.rearrange(
        patches_BPX,
        "B (h w) (p q C) -> B (h p) (w q) C",
        h=grid,
        w=grid,
        p=patch,
        q=patch,
        C=channels,
    )


def sincos2d_positions(grid: int, d_model: int) -> np.ndarray:
    """[grid*grid, D] fixed 2-D sin-cos embeddings (MAE / big_vision): half the
    features encode the row, half the column, each as sin and cos of
    frequencies 1 / 10000^(i / (D/4))."""
    quarter = d_model // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [np.sin(angle), np.cos(angle)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def block_class(cfg: TransformerConfig):
    from fmjax.models.text import block_class as text_block_class

    return text_block_class(cfg)


class VisionTransformer(nn.Module):
    """ViT encoder. Returns {"hidden": [B, T, D] (T = kept patches, plus the
    cls token first when pool="cls"), "pooled": [B, D] f32, and "logits" [B, N]
    f32 when num_classes > 0}."""

    config: ViTConfig

    @nn.compact
    def __call__(
        self,
        images_BHWC: Array,
        *,
        keep_BK: Array | None = None,
        deterministic: bool = True,
        pooled_only: bool = False,
    ) -> dict[str, Array]:
        """`pooled_only`: the caller reads the readout only ("pooled" and what
        follows it); with pool="cls" the last layer then computes the [cls]
        token's output alone and "hidden" is [B, 1, D] (`layers.Block`)."""
        cfg = self.config
        shape = images_BHWC.shape
        if (
            images_BHWC.ndim != 4
            or shape[1] != shape[2]
            or shape[1] % cfg.patch_size
            or shape[3] != cfg.channels
        ):
            raise ValueError(
                f"images have shape {shape}; expected [B, S, S, {cfg.channels}] "
                f"with S a multiple of patch_size={cfg.patch_size} (the model's "
                f"image_size is {cfg.image_size}; other sizes, such as DINO's "
                "local crops, get interpolated positions)"
            )
        numerics = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        patches_BPX = patchify(images_BHWC.astype(jnp.float32), cfg.patch_size)
        positions_PD = self._positions(shape[1] // cfg.patch_size)
        positions_BPD = positions_PD[None]
        if keep_BK is not None:  # only the kept patches embedded (P becomes K)
            patches_BPX = jnp.take_along_axis(patches_BPX, keep_BK[..., None], axis=1)
            positions_BPD = jnp.take(positions_PD, keep_BK, axis=0)
        x_BPD = EinsumDense(
            "BPX,XD->BPD",
            (cfg.patch_dim, cfg.d_model),
            ("patch", "embed"),
            init_std=(
                (2.0 / (cfg.patch_dim + cfg.d_model)) ** 0.5
                if cfg.patch_init == "xavier"
                else cfg.init_std
            ),
            name="patch_embed",
            **numerics,
        )(patches_BPX).astype(jnp.float32)
        x_BPD = x_BPD + positions_BPD
        if cfg.pool == "cls":
            # Zeros (MAE, big_vision) unless a LayerNorm follows at once
            # (pre_norm, CLIP's): it would divide a constant token by
            # sqrt(eps) and blow up its gradient; CLIP's random init then.
            cls_init = (
                nn.initializers.normal(cfg.d_model**-0.5)
                if cfg.pre_norm
                else nn.initializers.zeros
            )
            cls_11D = self.param(
                "cls",
                nn.with_logical_partitioning(cls_init, (None, None, "embed")),
                (1, 1, cfg.d_model),
                cfg.params_dtype,
            )
            cls_B1D = jnp.broadcast_to(
                cls_11D.astype(jnp.float32), (x_BPD.shape[0], 1, cfg.d_model)
            )
            x_BPD = jnp.concatenate([cls_B1D, x_BPD], axis=1)
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype)
        if cfg.pre_norm:
            x_BPD = LayerNorm(name="pre_norm", **norm)(x_BPD)
        x_BPD = nn.Dropout(cfg.dropout_rate)(x_BPD, deterministic=deterministic)
        x_BPD = nn.with_logical_constraint(x_BPD, ("batch", "length", "embed"))
        batch, length, _ = x_BPD.shape
        mask_B1PP = jnp.ones((batch, 1, length, length), bool)
        block_cfg = cfg.block_config()
        cls_only_B1 = None
        if pooled_only and cfg.pool == "cls":
            cls_only_B1 = jnp.zeros((batch, 1), jnp.int32)
        for i in range(cfg.num_layers):
            last = i == cfg.num_layers - 1
            x_BPD, _ = block_class(block_cfg)(
                block_cfg, pre_norm=True, name=f"layers_{i}"
            )(x_BPD, mask_B1PP, None, None, deterministic, None,
              cls_only_B1 if last else None)  # fmt: skip
        hidden_BPD = LayerNorm(name="encoder_norm", **norm)(x_BPD)
        out = {"hidden": hidden_BPD}
        if cfg.pool == "cls":
            pooled_BD = hidden_BPD[:, 0]
        elif cfg.pool == "mean":
            pooled_BD = hidden_BPD.mean(axis=1)
        else:
            pooled_BD = MapHead(cfg, name="map_head")(hidden_BPD)
        out["pooled"] = pooled_BD.astype(jnp.float32)
        if cfg.proj_layers:
            out["projection"] = ProjectionHead(cfg, name="projection")(out["pooled"])
        if cfg.num_classes:
            logits_BN = EinsumDense(
                "BD,DN->BN",
                (cfg.d_model, cfg.num_classes),
                ("embed", "classes"),
                init_std=cfg.init_std,
                name="classifier",
                **numerics,
            )(out["pooled"])
            out["logits"] = nn.with_logical_constraint(
                logits_BN.astype(jnp.float32), ("batch", "classes")
            )
        return out

    def _positions(self, grid: int) -> Array:
        """[grid*grid, D]: sin-cos for that grid, or the learned table (made for
        the config's grid) resized bilinearly to it."""
        cfg = self.config
        if cfg.position == "sincos2d":
            return jnp.asarray(sincos2d_positions(grid, cfg.d_model))
        table = self.param(
            "position_embed",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("position", "embed")
            ),
            (cfg.num_patches, cfg.d_model),
            cfg.params_dtype,
        ).astype(jnp.float32)
        if grid == cfg.grid:
            return table
        table_GGD = table.reshape(cfg.grid, cfg.grid, cfg.d_model)
        resized = jax.image.resize(table_GGD, (grid, grid, cfg.d_model), "bilinear")
        return resized.reshape(grid * grid, cfg.d_model)


class MapHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens,
    then a residual MLP (big_vision's MAPHead); returns [B, D]."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BPD: Array) -> Array:
        cfg = self.config
        numerics = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        heads, head_dim, d_model = cfg.num_heads, cfg.head_dim, cfg.d_model
        probe_11D = self.param(
            "probe",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), (None, None, "embed")
            ),
            (1, 1, d_model),
            cfg.params_dtype,
        )
        probe_B1D = jnp.broadcast_to(
            probe_11D.astype(jnp.float32), (x_BPD.shape[0], 1, d_model)
        )

        def dense(equation, shape, axes, name):
            return EinsumDense(
                equation, shape, axes, init_std=cfg.init_std, name=name, **numerics
            )

        axes = ("embed", "heads", "kv")
        q_B1HK = dense("BLD,DHK->BLHK", (d_model, heads, head_dim), axes, "query")(
            probe_B1D
        )
        k_BPHK = dense("BLD,DHK->BLHK", (d_model, heads, head_dim), axes, "key")(x_BPD)
        v_BPHK = dense("BLD,DHK->BLHK", (d_model, heads, head_dim), axes, "value")(
            x_BPD
        )
        mask_B11P = jnp.ones((x_BPD.shape[0], 1, 1, x_BPD.shape[1]), bool)
        probs_BH1P = attention_probs(q_B1HK, k_BPHK, mask_B11P)
        context_B1HK = attend_values(probs_BH1P, v_BPHK)
        y_B1D = dense(
            "BLHK,HKD->BLD", (heads, head_dim, d_model), ("heads", "kv", "embed"), "out"
        )(context_B1HK).astype(jnp.float32)
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype)
        h_B1D = LayerNorm(name="norm", **norm)(y_B1D)
        h_B1F = dense("BLD,DF->BLF", (d_model, cfg.mlp_dim), ("embed", "mlp"), "up")(
            h_B1D
        )
        h_B1F = activation_fn(cfg.activation)(h_B1F)
        h_B1D = dense("BLF,FD->BLD", (cfg.mlp_dim, d_model), ("mlp", "embed"), "down")(
            h_B1F
        )
        return (y_B1D + h_B1D.astype(jnp.float32))[:, 0]
