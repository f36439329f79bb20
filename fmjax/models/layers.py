"""Transformer building blocks shared by the text, vision and multimodal models.

Einsum letters (DESIGN.md's alphabet): B batch, L query length, S key length
(equals L until a KV cache or prefix slots extend the keys), D model width,
H query heads, G kv heads (GQA; H = G * Q with Q query heads per kv head),
K head dim, F MLP hidden, V vocab, T prefix slots / soft tokens.

Logical axis names used by parameters: "vocab", "type_vocab", "length",
"embed", "heads", "kv", "mlp", "classes"; activations also use "batch".
Projections and lookup tables (`EinsumDense`, `Embed`, whose weights may be
frozen NF4 codes) live in `fmjax.models.dense`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import native
from fmjax.models.attention import (
    _batched_prefix,
    apply_rope,
    attend_values,
    attention_probs,
    chunked_attention,
    write_cache,
)
from fmjax.models.config import ACTIVATIONS, TransformerConfig
from fmjax.models.dense import EinsumDense
from fmjax.sharding import positions_per_chunk

Array = jax.Array


def activation_fn(name: str):
    """ "gelu": exact, x Phi(x) (BERT, ViT); "gelu_tanh": tanh approximation
    (GPT-2); "quick_gelu": x * sigmoid(1.702 x) (OpenAI CLIP); "gelu_erfc":
    exact, as `jax.nn.gelu` writes it (for before/after benchmarks)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS}")
    xla = _xla_activation(name)
    if name == "gelu_erfc":
        return xla

    def activation(x):  # in one op each way where fmjax.native's kernels run
        return native.activation(x, name) if native.pointwise_fits(x) else xla(x)

    return activation


def _xla_activation(name: str):
    """The activation in XLA's ops."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return _gelu_erf
    return functools.partial(jax.nn.gelu, approximate=name == "gelu_tanh")


def _gelu_erf(x):
    """x Phi(x) written with erf, as PyTorch and HF compute it. `jax.nn.gelu`'s
    erfc form gives the same values to float rounding but costs XLA:CPU more
    per element (erfc evaluates two branches and an exp; docs/performance.md
    has the step-level measurement)."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))))


class LayerNorm(nn.LayerNorm):
    """flax LayerNorm with logically partitioned params, always computed in f32."""

    dtype: Any = jnp.float32
    scale_init: Any = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    bias_init: Any = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))

    @nn.compact
    def __call__(self, x, *args, **kwargs):
        x = x.astype(jnp.float32)
        native_fits = (
            not args
            and not kwargs
            and self.use_scale
            and self.use_bias
            and self.reduction_axes == -1
            and self.feature_axes == -1
            and native.pointwise_fits(x)
        )
        if not native_fits:
            return super().__call__(x, *args, **kwargs)
        # fmjax.native's kernels: the norm in one op, its gradients in another
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        return native.layer_norm(x, scale, bias, self.epsilon)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional RoPE.

    Params: query [D,H,K], key/value [D,G,K], out [H,K,D], each with a bias.
    Projection, position encoding and the softmax are separate steps so that a
    KV cache or prefix K/V slots can extend the keys (S > L) without touching
    the parameter tree.

    `prefix_kv=(k_TGK, v_TGK)` (prefix tuning): T key/value slots shared by the
    batch, in front of the projected keys/values (S = T + L), with a [B,1,L,T+L]
    mask (`make_attention_mask(..., num_prefix=T)`). No RoPE on prefix keys: they
    have no position (like cached keys rotated before the text began).

    `cache` (decoding, `init_cache`): {"k": [N,S,K], "v": [N,S,K],
    "end_index": int32} with N = B*G (batch major): one batch axis for the
    attention matmuls, so a decode step copies no cache (with a separate batch
    axis of size 1, XLA:CPU copied every layer's cache several times a step),
    and a new slot is one contiguous row per head. This call's keys/values
    are written at slots end_index .. end_index+L-1 and the queries read all S
    slots, so the mask, built by the caller, says which slots each query sees.
    Prefix-tuning slots live in the cache (`init_cache(prefix_kv=...)`), not
    in `prefix_kv`.
    Returns (out, cache); the cache is None when none was given.

    `queries_at_BQ` ([B, Q] int positions along L): only those positions ask
    (Q queries, out [B, Q, D]) while all L positions still give keys and values
    (and fill the cache). A model whose readout is one token (a ViT's [cls],
    CLIP's EOS, a sampler's last position) needs no more from its last layer,
    which then skips the other positions' query, output and MLP work
    (`Block`); the mask's and positions' rows are taken at the same places.

    When the [B, H, L, S] scores would exceed `max_scores_elements` per
    device, the queries go through `chunked_attention` (same result, the
    scores never whole in either pass).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    use_rope: bool = False
    rope_theta: float = 10000.0
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Above this many [B, H, L, S] scores per device, `chunked_attention`.
    max_scores_elements: int = 0

    def _dense(self, equation, shape, axes, name, std=None):
        return EinsumDense(
            equation,
            shape,
            axes,
            init_std=self.init_std if std is None else std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x_BLD: Array,
        mask_B1LS: Array,
        positions_BL: Array | None = None,
        *,
        prefix_kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
        cache: dict[str, Array] | None = None,
        queries_at_BQ: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        d_model = x_BLD.shape[-1]
        heads, head_dim = self.num_heads, self.head_dim
        kv_heads = self.num_kv_heads or heads
        axes = ("embed", "heads", "kv")
        q_shape, kv_shape = (d_model, heads, head_dim), (d_model, kv_heads, head_dim)
        x_q_BLD, q_positions_BL = x_BLD, positions_BL
        if queries_at_BQ is not None:
            x_q_BLD = take_rows(x_BLD, queries_at_BQ)
            mask_B1LS = take_rows(mask_B1LS, queries_at_BQ, axis=2)
            if positions_BL is not None:
                q_positions_BL = take_rows(positions_BL, queries_at_BQ)
        q_BLHK = self._dense("BLD,DHK->BLHK", q_shape, axes, "query")(x_q_BLD)
        k_BLGK = self._dense("BLD,DGK->BLGK", kv_shape, axes, "key")(x_BLD)
        v_BLGK = self._dense("BLD,DGK->BLGK", kv_shape, axes, "value")(x_BLD)
        if self.use_rope:
            if positions_BL is None:
                raise ValueError("Attention(use_rope=True) needs positions_BL")
            q_BLHK = apply_rope(q_BLHK, q_positions_BL, self.rope_theta)
            k_BLGK = apply_rope(k_BLGK, positions_BL, self.rope_theta)
        if cache is not None:
            if prefix_kv is not None:
                raise ValueError(
                    "with a KV cache, prefix slots are written into the cache "
                    "(init_cache(prefix_kv=...)); pass no prefix_kv"
                )
            cache = write_cache(cache, k_BLGK, v_BLGK)
            k, v, layouts = cache["k"], cache["v"], ("NSK", "NSK")
        else:
            k, v, layouts = k_BLGK, v_BLGK, ("BSGK", "BSGK")
            if prefix_kv is not None:  # no RoPE on the prefix: see the docstring
                k, v = (
                    jnp.concatenate([_batched_prefix(p, kv_BLGK), kv_BLGK], axis=1)
                    for p, kv_BLGK in zip(prefix_kv, (k, v), strict=True)
                )
        num_keys = k.shape[layouts[0].index("S")]
        if mask_B1LS.shape[-1] != num_keys:
            raise ValueError(
                f"attention mask {mask_B1LS.shape} has {mask_B1LS.shape[-1]} key "
                f"columns; expected {num_keys} (prefix slots + length, or cache "
                "slots)"
            )
        batch, length = q_BLHK.shape[:2]
        chunk_len = positions_per_chunk(
            batch, length, heads * num_keys, self.max_scores_elements
        )
        if chunk_len < length:
            context_BLHK = chunked_attention(
                q_BLHK,
                k,
                v,
                mask_B1LS,
                layouts,
                chunk_len,
                self._chunk_dropout(deterministic),
            )
        elif (
            layouts[0] == "BSGK"
            and (deterministic or not self.dropout_rate)
            and native.attention_fits(q_BLHK, k)
        ):  # a training step on CPU: one op each way (docs/performance.md)
            context_BLHK = native.attention(q_BLHK, k, v, mask_B1LS)
        else:
            probs_BHLS = attention_probs(q_BLHK, k, mask_B1LS, layouts[0])
            probs_BHLS = nn.Dropout(self.dropout_rate)(
                probs_BHLS, deterministic=deterministic
            )
            context_BLHK = attend_values(probs_BHLS, v, layouts[1])
        out_BLD = self._dense(
            "BLHK,HKD->BLD",
            (heads, head_dim, d_model),
            ("heads", "kv", "embed"),
            "out",
            std=self.out_init_std,
        )(context_BLHK)
        return out_BLD, cache

    def _chunk_dropout(self, deterministic: bool):
        """flax `nn.Dropout` for `chunked_attention`: one key drawn here, outside
        its scan, and folded with the chunk index, so chunks drop independently."""
        rate = self.dropout_rate
        if deterministic or rate == 0.0:
            return None
        rng = self.make_rng("dropout")

        def dropout(probs, index):
            keep = jax.random.bernoulli(
                jax.random.fold_in(rng, index), 1.0 - rate, probs.shape
            )
            return jnp.where(keep, probs / (1.0 - rate), 0.0)

        return dropout


def take_rows(x: Array, at_BQ: Array, axis: int = 1) -> Array:
    """x's entries at positions `at_BQ` ([B, Q] ints) along `axis`, per batch
    row (x's batch axis may be 1: it broadcasts), as [B, ..., Q, ...]."""
    batch, num = at_BQ.shape
    x = jnp.broadcast_to(x, (batch,) + x.shape[1:])
    ones = lambda n: (1,) * n  # noqa: E731
    index = at_BQ.reshape((batch,) + ones(axis - 1) + (num,) + ones(x.ndim - axis - 1))
    return jnp.take_along_axis(x, index, axis=axis)


class Mlp(nn.Module):
    """Dense D->F, activation, dense F->D (params `up`, `down`)."""

    mlp_dim: int
    activation: str = "gelu"
    init_std: float = 0.02
    out_init_std: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        d_model = x_BLD.shape[-1]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h_BLF = EinsumDense(
            "BLD,DF->BLF",
            (d_model, self.mlp_dim),
            ("embed", "mlp"),
            init_std=self.init_std,
            name="up",
            **common,
        )(x_BLD)
        h_BLF = activation_fn(self.activation)(h_BLF)
        return EinsumDense(
            "BLF,FD->BLD",
            (self.mlp_dim, d_model),
            ("mlp", "embed"),
            init_std=self.init_std if self.out_init_std is None else self.out_init_std,
            name="down",
            **common,
        )(h_BLF)


class Block(nn.Module):
    """Transformer layer: post-LN (BERT) or pre-LN (GPT-2, ViT).

    post-LN: x = LN(x + attn(x)); x = LN(x + mlp(x))
    pre-LN:  x = x + attn(LN(x)); x = x + mlp(LN(x))
    The residual stream stays in f32; matmuls run in `config.dtype`.
    """

    config: TransformerConfig
    pre_norm: bool
    # GPT-2 shrinks the init of the projections that write into the residual.
    residual_init_std: float | None = None

    @nn.compact
    def __call__(
        self,
        x_BLD: Array,
        mask_B1LS: Array,
        positions_BL: Array | None = None,
        prefix_kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
        cache: dict[str, Array] | None = None,
        outputs_at_BQ: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """`prefix_kv`: this layer's (k_TGK, v_TGK) prefix slots; `cache`: its KV
        cache (see Attention). `outputs_at_BQ`: return x only at these [B, Q]
        positions (a model's last layer when its readout needs no more; every
        position still gives keys and values). Returns (x, cache). Arguments
        may be positional so that `block_class` can remat it."""
        cfg = self.config
        numerics = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        attention = Attention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            num_kv_heads=cfg.num_kv_heads,
            use_rope=cfg.position == "rope",
            rope_theta=cfg.rope_theta,
            dropout_rate=cfg.attention_dropout_rate,
            init_std=cfg.init_std,
            out_init_std=self.residual_init_std,
            max_scores_elements=cfg.max_attention_elements,
            name="attention",
            **numerics,
        )
        mlp = Mlp(
            mlp_dim=cfg.mlp_dim,
            activation=cfg.activation,
            init_std=cfg.init_std,
            out_init_std=self.residual_init_std,
            name="mlp",
            **numerics,
        )
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype)
        attention_norm = LayerNorm(name="attention_norm", **norm)
        mlp_norm = LayerNorm(name="mlp_norm", **norm)
        dropout = nn.Dropout(cfg.dropout_rate)
        attention_kwargs = dict(
            prefix_kv=prefix_kv,
            deterministic=deterministic,
            cache=cache,
            queries_at_BQ=outputs_at_BQ,
        )
        rows = lambda x: x if outputs_at_BQ is None else take_rows(x, outputs_at_BQ)  # noqa: E731
        new_cache = None

        def attend(h):
            nonlocal new_cache
            out, new_cache = attention(h, mask_B1LS, positions_BL, **attention_kwargs)
            return dropout(out, deterministic=deterministic)

        def feed_forward(h):
            return dropout(mlp(h), deterministic=deterministic)

        x_BLD = x_BLD.astype(jnp.float32)
        if self.pre_norm:
            x_BLD = rows(x_BLD) + attend(attention_norm(x_BLD))
            x_BLD = x_BLD + feed_forward(mlp_norm(x_BLD))
        else:
            x_BLD = attention_norm(rows(x_BLD) + attend(x_BLD))
            x_BLD = mlp_norm(x_BLD + feed_forward(x_BLD))
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
        return x_BLD, new_cache


def residual_init_std(config: TransformerConfig) -> float:
    """GPT-2's init for projections into the residual: std / sqrt(2 * layers)."""
    return config.init_std / math.sqrt(2 * config.num_layers)
