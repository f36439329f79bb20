"""Attention arithmetic and the KV cache, outside any Flax module: masks,
RoPE, softmax(q.k) and the weighted values (whole or in query chunks), and
the cache `Attention` (`fmjax.models.layers`) reads and writes when decoding.

Einsum letters as in `fmjax.models.layers`; N = B*G in a KV cache.
"""

from __future__ import annotations

import functools
from typing import Any

import einops
import jax
import jax.numpy as jnp

from fmjax import native

Array = jax.Array

# Not -inf: a row with every key masked (padding) must still give a finite softmax.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def make_attention_mask(
    segment_ids_BL: Array, causal: bool, num_prefix: int = 0
) -> Array:
    """bool [B,1,L,T+L]: query i may attend key j (same nonzero segment; j<=i if
    causal). The first `num_prefix` (T) columns are prefix K/V slots, visible to
    every non-padding query; rows of padding (segment 0) attend to nothing.
    """
    seg_BL1 = segment_ids_BL[:, :, None]
    seg_B1L = segment_ids_BL[:, None, :]
    mask_BLL = (seg_BL1 == seg_B1L) & (seg_BL1 != 0)
    if causal:
        length = segment_ids_BL.shape[1]
        causal_1LL = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
        mask_BLL = mask_BLL & causal_1LL
    if num_prefix:
        prefix_BLT = jnp.broadcast_to(seg_BL1 != 0, (*seg_BL1.shape[:2], num_prefix))
        mask_BLL = jnp.concatenate([prefix_BLT, mask_BLL], axis=-1)
    return mask_BLL[:, None]


def apply_rope(x_BLHK: Array, positions_BL: Array, theta: float) -> Array:
    """Rotary embedding, half-split layout (as GPT-NeoX / HF Llama `rotate_half`)."""
    head_dim = x_BLHK.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rope: head dim {head_dim} must be even")
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BLk = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq[None, None]
    sin_BL1k = jnp.sin(angles_BLk)[:, :, None, :]
    cos_BL1k = jnp.cos(angles_BLk)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate(
        [x1 * cos_BL1k - x2 * sin_BL1k, x2 * cos_BL1k + x1 * sin_BL1k], axis=-1
    )
    return rotated.astype(x_BLHK.dtype)


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis whose derivative needs only its output:
    d softmax = y * (dx - sum(y * dx)). `jax.nn.softmax` has this rule only
    under the `jax_softmax_custom_jvp` flag, off by default in JAX 0.10;
    without it autodiff goes through the exponentials, their sum and the
    division, and the backward pass reads several [B, H, L, S] arrays where
    this one reads two (docs/performance.md has the step-level measurement)."""
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
    return unnormalized / unnormalized.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - (y * x_dot).sum(-1, keepdims=True))


def attention_probs(
    q_BLHK: Array, k: Array, mask_B1LS: Array, k_layout: str = "BSGK"
) -> Array:
    """Softmax(q.k / sqrt(K)) in f32 -> [B, H, L, S]; GQA when k has G < H heads.
    `k_layout`: "BSGK" (projected keys) or "NSK" (a KV cache's, N = B*G).
    The queries are scaled, not the scores (as flax's dot_product_attention
    does): [B, L, H, K] is smaller than [B, H, L, S] wherever S > K, and on
    XLA:CPU the scores' scale reached the softmax's backward pass as a
    constant [B, H, L, S] array written out every step. Projected q and k
    are made heads-major ([B, G, L, K]) before the product: from [B, L, G, K]
    XLA:CPU made the scores in [S, L] order and copied them to [L, S] and
    back (docs/performance.md)."""
    batch = q_BLHK.shape[0]
    q_BLHK = q_BLHK * jnp.asarray(q_BLHK.shape[-1] ** -0.5, q_BLHK.dtype)
    if k_layout == "NSK":
        q_NLQK = einops.rearrange(
            q_BLHK, "B L (G Q) K -> (B G) L Q K", G=k.shape[0] // batch
        )
        if native.cache_attention_fits(_rows(q_NLQK), k):  # decoding on CPU
            scores = native.cache_scores(_rows(q_NLQK), k)
            scores_NLQS = scores.reshape(*q_NLQK.shape[:3], -1)
        else:
            scores_NLQS = jnp.einsum(
                "NLQK,NSK->NLQS", q_NLQK, k, preferred_element_type=jnp.float32
            )
        scores_BGQLS = einops.rearrange(
            scores_NLQS, "(B G) L Q S -> B G Q L S", B=batch
        )
    else:
        q_BGQLK = einops.rearrange(q_BLHK, "B L (G Q) K -> B G Q L K", G=k.shape[2])
        k_BGSK = einops.rearrange(k, "B S G K -> B G S K")
        scores_BGQLS = jnp.einsum(
            "BGQLK,BGSK->BGQLS", q_BGQLK, k_BGSK, preferred_element_type=jnp.float32
        )
    scores_BGQLS = jnp.where(mask_B1LS[:, :, None], scores_BGQLS, _MASKED_SCORE)
    probs_BGQLS = softmax(scores_BGQLS)
    return einops.rearrange(probs_BGQLS, "B G Q L S -> B (G Q) L S")


def _rows(x_NLQX: Array) -> Array:
    """[N, L, Q, X] -> [N, L * Q, X]: a cache row's queries as one axis."""
    return x_NLQX.reshape(x_NLQX.shape[0], -1, x_NLQX.shape[-1])


def attend_values(probs_BHLS: Array, v: Array, v_layout: str = "BSGK") -> Array:
    """Probability-weighted values -> [B, L, H, K] (H query heads). `v_layout`:
    "BSGK" (projected values, made heads-major first, as in `attention_probs`)
    or "NSK" (a KV cache's, N = B*G)."""
    batch = probs_BHLS.shape[0]
    if v_layout == "NSK":
        probs_NLQS = einops.rearrange(
            probs_BHLS, "B (G Q) L S -> (B G) L Q S", G=v.shape[0] // batch
        )
        probs_NLQS = probs_NLQS.astype(v.dtype)
        if native.cache_attention_fits(_rows(probs_NLQS), v):
            out = native.cache_values(_rows(probs_NLQS), v)
            out_NLQK = out.reshape(*probs_NLQS.shape[:3], -1)
        else:
            out_NLQK = jnp.einsum("NLQS,NSK->NLQK", probs_NLQS, v)
        return einops.rearrange(out_NLQK, "(B G) L Q K -> B L (G Q) K", B=batch)
    probs_BGQLS = einops.rearrange(probs_BHLS, "B (G Q) L S -> B G Q L S", G=v.shape[2])
    v_BGSK = einops.rearrange(v, "B S G K -> B G S K")
    out_BGQLK = jnp.einsum("BGQLS,BGSK->BGQLK", probs_BGQLS.astype(v.dtype), v_BGSK)
    return einops.rearrange(out_BGQLK, "B G Q L K -> B L (G Q) K")


def chunked_attention(
    q_BLHK: Array,
    k: Array,
    v: Array,
    mask_B1LS: Array,
    layouts: tuple[str, str],
    chunk_len: int,
    dropout=None,
) -> Array:
    """`attend_values(attention_probs(q, k, mask), v)` -> [B, L, H, K], the
    queries taken `chunk_len` at a time inside a `lax.scan`, each chunk
    rematerialised (`jax.checkpoint`) in the backward pass: the [B, H, L, S]
    scores and probabilities exist one [B, H, chunk_len, S] slice at a time in
    both passes (as "Self-attention does not need O(n^2) memory", Rabe and
    Staats 2021, without the key blocking: each query row still sees all S
    keys in one softmax, so every row is computed exactly as before).
    `dropout(probs, chunk_index)`, if given, drops attention probabilities
    per chunk. Padding queries (a length `chunk_len` does not divide) see no
    key and are cut off."""
    length = q_BLHK.shape[1]
    num_chunks = -(-length // chunk_len)
    pad = num_chunks * chunk_len - length
    if pad:
        q_BLHK = jnp.pad(q_BLHK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask_B1LS = jnp.pad(mask_B1LS, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_NBCHK = einops.rearrange(q_BLHK, "B (N C) H K -> N B C H K", C=chunk_len)
    mask_NB1CS = einops.rearrange(mask_B1LS, "B o (N C) S -> N B o C S", C=chunk_len)

    # prevent_cse=False: inside a scan, CSE cannot undo the rematerialisation.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_context(q_BCHK, mask_B1CS, index):
        probs_BHCS = attention_probs(q_BCHK, k, mask_B1CS, layouts[0])
        if dropout is not None:
            probs_BHCS = dropout(probs_BHCS, index)
        return attend_values(probs_BHCS, v, layouts[1])

    def step(_, chunk):
        return None, chunk_context(*chunk)

    _, context_NBCHK = jax.lax.scan(
        step, None, (q_NBCHK, mask_NB1CS, jnp.arange(num_chunks))
    )
    context_BLHK = einops.rearrange(context_NBCHK, "N B C H K -> B (N C) H K")
    return context_BLHK[:, :length]


def init_cache(
    batch: int,
    slots: int,
    kv_heads: int,
    head_dim: int,
    dtype: Any,
    prefix_kv: tuple[Array, Array] | None = None,
) -> dict[str, Array]:
    """One layer's KV cache of `slots` positions (see Attention), empty or with
    this layer's prefix-tuning slots (k_TGK, v_TGK) written in front."""
    cache = {
        "k": jnp.zeros((batch * kv_heads, slots, head_dim), dtype),
        "v": jnp.zeros((batch * kv_heads, slots, head_dim), dtype),
        "end_index": jnp.zeros((), jnp.int32),
    }
    if prefix_kv is None:
        return cache
    like_BLGK = jnp.zeros((batch, 1, kv_heads, head_dim), dtype)
    k_BTGK, v_BTGK = (_batched_prefix(p, like_BLGK) for p in prefix_kv)
    return write_cache(cache, k_BTGK, v_BTGK)


def model_cache(cfg, batch: int, slots: int, prefix_kv=None) -> list[dict]:
    """Every layer's KV cache of `slots` slots (`init_cache`), with prefix
    tuning's `prefix_kv` (k and v, each [num_layers, T, G, K]) in front."""
    return [
        init_cache(
            batch,
            slots,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.compute_dtype,
            None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i]),
        )
        for i in range(cfg.num_layers)
    ]


def write_cache(cache: dict[str, Array], k_BLGK: Array, v_BLGK: Array) -> dict:
    """`cache` with k/v written at slots end_index.. (in place under jit when the
    cache is donated or carried by a loop), end_index moved past them."""
    end, slots = cache["end_index"], cache["k"].shape[1]
    if k_BLGK.shape[1] > slots:
        raise ValueError(
            f"{k_BLGK.shape[1]} new keys do not fit a cache of {slots} slots"
        )
    k_NLK = einops.rearrange(k_BLGK, "B L G K -> (B G) L K").astype(cache["k"].dtype)
    v_NLK = einops.rearrange(v_BLGK, "B L G K -> (B G) L K").astype(cache["v"].dtype)
    update = jax.lax.dynamic_update_slice_in_dim
    return {
        "k": update(cache["k"], k_NLK, end, axis=1),
        "v": update(cache["v"], v_NLK, end, axis=1),
        "end_index": end + k_BLGK.shape[1],
    }


def _batched_prefix(prefix_TGK: Array, like_BLGK: Array) -> Array:
    """A layer's prefix [T,G,K] broadcast to [B,T,G,K] in the keys' dtype."""
    batch, _, kv_heads, head_dim = like_BLGK.shape
    if prefix_TGK.ndim != 3 or prefix_TGK.shape[1:] != (kv_heads, head_dim):
        raise ValueError(
            f"prefix K/V shape {prefix_TGK.shape}: expected [T, {kv_heads}, {head_dim}]"
        )
    prefix_1TGK = prefix_TGK.astype(like_BLGK.dtype)[None]
    return jnp.broadcast_to(prefix_1TGK, (batch, *prefix_TGK.shape))
