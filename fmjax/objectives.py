"""Training objectives: pure, jit-friendly functions of arrays.

Every loss returns `(loss, metrics)`: `loss` is the weighted mean (the value to
differentiate) and `metrics` holds f32 *sums* (`loss_sum`, `correct`, `count`)
so they add up exactly across batches, devices and accumulation steps;
`summarize` turns summed metrics into means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def mlm_mask(
    rng: Array,
    tokens_BL: Array,
    segment_ids_BL: Array,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    rate: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[Array, Array, Array]:
    """BERT masking. Returns (inputs_BL, targets_BL, weights_BL).

    Each non-special, non-padding position is selected with probability `rate`;
    a selected token becomes `mask_id` (mask_frac), a random non-special id
    (random_frac) or stays as it is (the rest). targets are the original tokens;
    weights are 1.0 at selected positions, else 0.
    """
    specials = sorted({int(s) for s in special_ids})
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate={rate}: expected a value in (0, 1]")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0:
        raise ValueError(
            f"mask_frac={mask_frac}, random_frac={random_frac}: expected "
            "non-negative fractions with a sum <= 1"
        )
    if any(not 0 <= s < vocab_size for s in specials):
        raise ValueError(f"special_ids={specials}: expected ids in [0, {vocab_size})")
    if len(specials) >= vocab_size:
        raise ValueError(f"special_ids={specials} leave no ordinary id to sample")

    select_rng, action_rng, token_rng = jax.random.split(rng, 3)
    eligible_BL = segment_ids_BL != 0
    for s in specials:
        eligible_BL &= tokens_BL != s
    selected_BL = eligible_BL & (jax.random.uniform(select_rng, tokens_BL.shape) < rate)

    action_BL = jax.random.uniform(action_rng, tokens_BL.shape)
    to_mask_BL = selected_BL & (action_BL < mask_frac)
    to_random_BL = (
        selected_BL & (action_BL >= mask_frac) & (action_BL < mask_frac + random_frac)
    )
    # Draw an index among the ordinary ids, then step over each special id at or
    # below it (ascending), which maps index r to the r-th non-special id.
    random_BL = jax.random.randint(
        token_rng, tokens_BL.shape, 0, vocab_size - len(specials), dtype=jnp.int32
    )
    for s in specials:
        random_BL = random_BL + (random_BL >= s).astype(jnp.int32)

    inputs_BL = jnp.where(to_mask_BL, jnp.asarray(mask_id, tokens_BL.dtype), tokens_BL)
    inputs_BL = jnp.where(to_random_BL, random_BL.astype(tokens_BL.dtype), inputs_BL)
    return inputs_BL, tokens_BL, selected_BL.astype(jnp.float32)


def max_predictions(seq_len: int, rate: float) -> int:
    """How many masked positions per row the MLM head scores: the mean plus six
    standard deviations of Binomial(seq_len, rate), so a row essentially never has
    more (as BERT's `max_predictions_per_seq`, derived instead of hand-set)."""
    mean = seq_len * rate
    return min(seq_len, int(np.ceil(mean + 6 * np.sqrt(mean * (1 - rate)))) + 1)


def gather_predictions(
    targets_BL: Array, weights_BL: Array, num: int
) -> tuple[Array, Array, Array]:
    """The `num` positions per row to score: selected ones first.

    Returns (positions_BK, targets_BK, weights_BK). Scoring only these positions
    cuts the MLM head's cost (a D x V matmul per token) by about L / K. A
    selection beyond `num` in a row (probability below 1e-9 per row) stays masked in
    the input and is not scored.
    """
    _, positions_BK = jax.lax.top_k(weights_BL, num)
    targets_BK = jnp.take_along_axis(targets_BL, positions_BK, axis=1)
    weights_BK = jnp.take_along_axis(weights_BL, positions_BK, axis=1)
    return positions_BK, targets_BK, weights_BK


def _weighted_cross_entropy(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array
) -> tuple[Array, dict[str, Array]]:
    logits_BLV = logits_BLV.astype(jnp.float32)
    weights_BL = weights_BL.astype(jnp.float32)
    # One max feeds both logsumexp and accuracy: an argmax would be another (slow,
    # variadic) reduction over the [B, L, V] logits.
    max_BL = jax.lax.stop_gradient(jnp.max(logits_BLV, axis=-1))
    log_z_BL = max_BL + jnp.log(
        jnp.sum(jnp.exp(logits_BLV - max_BL[..., None]), axis=-1)
    )
    target_logit_BL = jnp.take_along_axis(
        logits_BLV, targets_BL[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    # Ties with another logit count as correct; with float logits they are rare.
    correct_BL = (target_logit_BL >= max_BL).astype(jnp.float32)
    metrics = {
        "loss_sum": jnp.sum(nll_BL * weights_BL),
        "correct": jnp.sum(correct_BL * weights_BL),
        "count": jnp.sum(weights_BL),
    }
    # max() keeps the division (and its gradient) finite for an all-zero batch.
    loss = metrics["loss_sum"] / jnp.maximum(metrics["count"], 1e-8)
    return loss, metrics


def mlm_loss(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean cross-entropy over the masked positions."""
    return _weighted_cross_entropy(logits_BLV, targets_BL, weights_BL)


def next_token_loss(
    logits_BLV: Array, tokens_BL: Array, segment_ids_BL: Array
) -> tuple[Array, dict[str, Array]]:
    """Position t predicts tokens[t+1], counted only where segment[t+1] ==
    segment[t] != 0: never across packed documents and never into padding."""
    # Shift the targets, not the logits: slicing [B, L, V] logits would copy them.
    pad = ((0, 0), (0, 1))
    seg_next_BL = jnp.pad(segment_ids_BL[:, 1:], pad)  # 0 after the last position
    targets_BL = jnp.pad(tokens_BL[:, 1:], pad)
    weights_BL = ((seg_next_BL == segment_ids_BL) & (segment_ids_BL != 0)).astype(
        jnp.float32
    )
    return _weighted_cross_entropy(logits_BLV, targets_BL, weights_BL)


def classification_loss(
    logits_BN: Array, labels_B: Array, weights_B: Array
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean cross-entropy over examples; `count` is the summed weight
    (padding rows of an eval batch have weight 0)."""
    if logits_BN.ndim != 2 or labels_B.shape != logits_BN.shape[:1]:
        raise ValueError(
            f"classification_loss: logits {logits_BN.shape}, labels "
            f"{labels_B.shape}; expected [B, N] and [B]"
        )
    return _weighted_cross_entropy(logits_BN, labels_B, weights_B)


def summarize(metrics: Mapping[str, Array]) -> dict[str, Array]:
    """loss, accuracy, perplexity (and count) from summed metrics.

    Uses jax.numpy for jax inputs (so it also works under jit), numpy otherwise.
    """
    values = (metrics["loss_sum"], metrics["correct"], metrics["count"])
    xp = jnp if any(isinstance(v, jax.Array) for v in values) else np
    loss_sum, correct, count = (xp.asarray(v, dtype=xp.float32) for v in values)
    safe_count = xp.maximum(count, 1e-8)
    loss = loss_sum / safe_count
    return {
        "loss": loss,
        "accuracy": correct / safe_count,
        "perplexity": xp.exp(loss),
        "count": count,
    }
