"""The LM head and its cross-entropy without whole [B, L, V] logits.

`chunked_cross_entropy` gives the loss and summed metrics of
`objectives.weighted_cross_entropy(logits_fn(hidden_BLD), ...)` while holding
one chunk of positions' logits at a time, in both passes (Liger's fused
linear cross-entropy, MaxText's vocabulary tiling). The models switch to it
above `config.max_logits_elements` logits per device (`models.text`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.objectives import (
    cross_entropy_sums,
    log_z_and_target,
    mean_of_sums,
    sums_and_nll,
)
from fmjax.sharding import BATCH_AXES, batch_devices

Array = jax.Array


def chunked_cross_entropy(
    hidden_BLD: Array,
    logits_fn: Callable[[Array], Array],
    targets_BL: Array,
    weights_BL: Array,
    chunk_len: int,
    max_local_head_elements: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """`weighted_cross_entropy(logits_fn(hidden_BLD), ...)` without the whole
    [B, L, V] logits or their gradient: `logits_fn` ([B, C, D] -> [B, C, V],
    the model's own head: tied, untied, MLM transform and bias, LoRA; no
    sharding constraint on the batch) runs on C = `chunk_len` positions at a
    time inside a `lax.scan`.

    Under differentiation each chunk's gradient is taken where its logits
    are made: the softmax's closed form (softmax - one-hot, times the
    weights) is pulled back through `logits_fn` (`jax.vjp`) to the chunk's
    hidden states and the head's weights, and the backward pass only scales
    those by the cotangent of `loss_sum`. So no pass holds more than one
    chunk's logits, and the head costs its 3 matmuls per step, as whole
    logits do (a rematerialised chunk would cost 4). The gradients are exact
    for `loss_sum` and `count` (`correct` is piecewise constant: zero).

    Chunks run over positions rather than the vocabulary, so a mesh that
    splits the batch keeps it split; and each batch shard sums its own head
    gradient and metrics over the chunks, so the devices add theirs up once
    per step, not once per chunk. That takes a whole f32 copy of the head's
    gradient on every device; when the head has more than
    `max_local_head_elements` elements (None: no limit), only the "data"
    axis's shards keep their own, and within each, the devices that "fsdp"
    shards the params over reduce-scatter every chunk's gradient into their
    slices (memory of a sharded head, communication per chunk). A length
    that `chunk_len` does not divide is padded with weight-0 positions,
    which add nothing to the sums.
    """
    batch, length, _ = hidden_BLD.shape
    if targets_BL.shape != (batch, length) or weights_BL.shape != (batch, length):
        raise ValueError(
            f"targets {targets_BL.shape} and weights {weights_BL.shape}: expected "
            f"[B, L] = {(batch, length)}, the hidden states' first two dims"
        )
    if not 1 <= chunk_len <= length:
        raise ValueError(f"chunk_len={chunk_len}: expected 1 <= chunk_len <= {length}")
    # The head's weights, closed over by `logits_fn`, become explicit inputs
    # that the custom gradient can return cotangents for.
    head_fn, head = jax.closure_convert(logits_fn, hidden_BLD[:, :chunk_len])
    targets_BL = targets_BL.astype(jnp.int32)
    weights_BL = weights_BL.astype(jnp.float32)  # its cotangent is float32
    head_elements = sum(int(np.size(w)) for w in head)
    local = max_local_head_elements is None or head_elements <= max_local_head_elements
    axes = BATCH_AXES if local else BATCH_AXES[:1]
    shards = batch_devices(batch, axes)
    return mean_of_sums(
        _fused_sums(
            head_fn,
            (chunk_len, axes),
            shards,
            hidden_BLD,
            targets_BL,
            weights_BL,
            *head,
        )
    )


def _chunks(chunk_len: int, shards: int, *xs_BL):
    """Each [B, L, ...] array padded to whole chunks (weights with 0) and split
    [N, S, b, C, ...] (S = `shards` of b rows); and a function joining
    [N, S, b, C, ...] back to [B, L, ...]."""
    length = xs_BL[0].shape[1]
    pad = -length % chunk_len
    split = lambda x: einops.rearrange(  # noqa: E731
        jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)),
        "(S b) (N C) ... -> N S b C ...", S=shards, C=chunk_len,
    )  # fmt: skip
    join = lambda x: einops.rearrange(x, "N S b C ... -> (S b) (N C) ...")[:, :length]  # noqa: E731
    return [split(x) for x in xs_BL], join


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_sums(head_fn, layout, shards, hidden_BLD, targets_BL, weights_BL, *head):
    """`layout`: (chunk_len, the mesh axes the `shards` run over)."""
    chunk_len, _ = layout
    (h_NSbCD, targets_NSbC, weights_NSbC), _ = _chunks(
        chunk_len, shards, hidden_BLD, targets_BL, weights_BL
    )

    def step(total, chunk):
        h_BCD, targets_BC, weights_BC = (
            einops.rearrange(x, "S b ... -> (S b) ...") for x in chunk
        )
        sums = cross_entropy_sums(head_fn(h_BCD, *head), targets_BC, weights_BC)
        return {k: total[k] + sums[k] for k in total}, None

    zero = jnp.zeros((), jnp.float32)
    total = {"loss_sum": zero, "correct": zero, "count": zero}
    return jax.lax.scan(step, total, (h_NSbCD, targets_NSbC, weights_NSbC))[0]


def _fused_sums_fwd(head_fn, layout, shards, hidden_BLD, targets_BL, weights_BL, *head):
    chunk_len, axes = layout
    (h_NSbCD, targets_NSbC, weights_NSbC), join = _chunks(
        chunk_len, shards, hidden_BLD, targets_BL, weights_BL
    )

    def shard_chunk(h_bCD, targets_bC, weights_bC):
        """One batch shard's sums, per-position NLL and gradients for one chunk."""
        out_bCV, pull_back = jax.vjp(head_fn, h_bCD, *head)
        logits_bCV, *parts = log_z_and_target(out_bCV, targets_bC)
        sums, nll_bC = sums_and_nll(*parts, weights_bC)
        with jax.named_scope("cross_entropy"):  # softmax - one-hot, weighted
            log_z_bC1 = parts[1][..., None]
            one_hot_bCV = jax.nn.one_hot(targets_bC, logits_bCV.shape[-1])
            d_logits_bCV = jnp.exp(logits_bCV - log_z_bC1) - one_hot_bCV
            d_logits_bCV *= weights_bC[..., None]
        d_h_bCD, *d_head = pull_back(d_logits_bCV.astype(out_bCV.dtype))
        return sums, nll_bC, d_h_bCD, d_head

    # Vmapped over the shards (each device's rows when a mesh splits the
    # batch), the sums and the head's gradient come per shard, [S, ...], and
    # stay on their devices until the scan ends: one reduction per step.
    spmd = axes if shards > 1 else None
    per_shard = jax.vmap(shard_chunk, spmd_axis_name=spmd)

    def step(carry, chunk):
        sums_S, nll_SbC, d_h_SbCD, d_chunk_S = per_shard(*chunk)
        carry = jax.tree.map(
            lambda a, b: a + b.astype(a.dtype), carry, (sums_S, d_chunk_S)
        )
        return carry, (d_h_SbCD, nll_SbC)

    zero_S = jnp.zeros((shards,), jnp.float32)
    total_S = {"loss_sum": zero_S, "correct": zero_S, "count": zero_S}
    d_head_S = [jnp.zeros((shards, *w.shape), jnp.float32) for w in head]
    (total_S, d_head_S), (d_h_NSbCD, nll_NSbC) = jax.lax.scan(
        step, (total_S, d_head_S), (h_NSbCD, targets_NSbC, weights_NSbC)
    )
    total = {k: jnp.sum(v) for k, v in total_S.items()}
    d_head = [
        jnp.sum(d, axis=0).astype(w.dtype) for d, w in zip(d_head_S, head, strict=True)
    ]
    return total, (join(d_h_NSbCD), join(nll_NSbC), targets_BL, d_head)


def _fused_sums_bwd(head_fn, layout, shards, residuals, d_sums):
    del head_fn, layout, shards
    d_hidden_BLD, nll_BL, targets_BL, d_head = residuals
    d_loss = d_sums["loss_sum"]
    d_weights_BL = d_loss * nll_BL + d_sums["count"]
    return (
        (d_loss * d_hidden_BLD).astype(d_hidden_BLD.dtype),
        np.zeros(targets_BL.shape, jax.dtypes.float0),
        d_weights_BL,
        *[(d_loss * d).astype(d.dtype) for d in d_head],
    )


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)
