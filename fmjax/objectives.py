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


def cross_entropy_sums(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array
) -> dict[str, Array]:
    """The summed metrics (`loss_sum`, `correct`, `count`) of weighted
    cross-entropy; the one place that turns logits into them."""
    _, *parts = log_z_and_target(logits_BLV, targets_BL)
    return sums_and_nll(*parts, weights_BL)[0]


@jax.named_scope("cross_entropy")  # names its ops in profiles
def log_z_and_target(logits_BLV: Array, targets_BL: Array):
    """(f32 logits, max, log-partition, target logit), the last three [B, L]."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    # One max feeds both logsumexp and accuracy: an argmax would be another (slow,
    # variadic) reduction over the [B, L, V] logits.
    max_BL = jax.lax.stop_gradient(jnp.max(logits_BLV, axis=-1))
    log_z_BL = max_BL + jnp.log(
        jnp.sum(jnp.exp(logits_BLV - max_BL[..., None]), axis=-1)
    )
    target_logit_BL = jnp.take_along_axis(
        logits_BLV, targets_BL[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
    return logits_BLV, max_BL, log_z_BL, target_logit_BL


@jax.named_scope("cross_entropy")
def sums_and_nll(max_BL, log_z_BL, target_logit_BL, weights_BL):
    """(summed metrics, per-position negative log-likelihood)."""
    weights_BL = weights_BL.astype(jnp.float32)
    nll_BL = log_z_BL - target_logit_BL
    # Ties with another logit count as correct; with float logits they are rare.
    correct_BL = (target_logit_BL >= max_BL).astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(nll_BL * weights_BL),
        "correct": jnp.sum(correct_BL * weights_BL),
        "count": jnp.sum(weights_BL),
    }
    return sums, nll_BL


def mean_of_sums(metrics: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    # max() keeps the division (and its gradient) finite for an all-zero batch.
    loss = metrics["loss_sum"] / jnp.maximum(metrics["count"], 1e-8)
    return loss, metrics


def weighted_cross_entropy(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array
) -> tuple[Array, dict[str, Array]]:
    """(weighted mean cross-entropy, summed metrics) of whole logits."""
    return mean_of_sums(cross_entropy_sums(logits_BLV, targets_BL, weights_BL))


def mlm_loss(
    logits_BLV: Array, targets_BL: Array, weights_BL: Array
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean cross-entropy over the masked positions."""
    return weighted_cross_entropy(logits_BLV, targets_BL, weights_BL)


def next_token_targets(
    tokens_BL: Array, segment_ids_BL: Array, loss_mask_BL: Array | None = None
) -> tuple[Array, Array]:
    """(targets_BL, weights_BL) of next-token prediction: position t predicts
    tokens[t+1], counted only where segment[t+1] == segment[t] != 0 (never
    across packed documents, never into padding) and, with `loss_mask_BL`,
    where loss_mask[t+1] is set (a completion's tokens)."""
    # Shift the targets, not the logits: slicing [B, L, V] logits would copy them.
    pad = ((0, 0), (0, 1))
    seg_next_BL = jnp.pad(segment_ids_BL[:, 1:], pad)  # 0 after the last position
    targets_BL = jnp.pad(tokens_BL[:, 1:], pad)
    weights_BL = (seg_next_BL == segment_ids_BL) & (segment_ids_BL != 0)
    if loss_mask_BL is not None:
        weights_BL &= jnp.pad(loss_mask_BL[:, 1:], pad) != 0
    return targets_BL, weights_BL.astype(jnp.float32)


def next_token_loss(
    logits_BLV: Array,
    tokens_BL: Array,
    segment_ids_BL: Array,
    loss_mask_BL: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Weighted mean cross-entropy of next-token prediction over the targets
    `next_token_targets` counts."""
    targets_BL, weights_BL = next_token_targets(tokens_BL, segment_ids_BL, loss_mask_BL)
    return weighted_cross_entropy(logits_BLV, targets_BL, weights_BL)


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
    return weighted_cross_entropy(logits_BN, labels_B, weights_B)


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


# --- image-text (CLIP, SigLIP) ----------------------------------------------------
#
# image_BE, text_BE: unit-norm embeddings of B pairs (row i of each is a pair);
# weights_B: 1 for real pairs, 0 for padding (neither a row nor a column).
# Every function returns sums: "loss_sum" over real pairs, "count" real
# pairs (CLIP's mean over the batch; SigLIP's sum over all B x B pairs divided
# by B), and "correct_i2t" / "correct_t2i", pairs whose own caption (image)
# scores highest in the batch.


def _pair_logits(image_BE, text_BE, logit_scale, logit_bias=None):
    logits_BB = jnp.exp(logit_scale) * jnp.einsum(
        "BE,CE->BC", image_BE.astype(jnp.float32), text_BE.astype(jnp.float32)
    )
    return logits_BB if logit_bias is None else logits_BB + logit_bias


def _masked(logits, real_columns):
    # A large finite negative rather than -inf: no inf * 0 in padding rows.
    return jnp.where(real_columns, logits, -1e9)


def _infonce_rows(logits_bC, labels_b, real_C):
    """(-log softmax at the label, label is the argmax) per row."""
    log_probs = jax.nn.log_softmax(_masked(logits_bC, real_C[None, :]), axis=-1)
    loss_b = -jnp.take_along_axis(log_probs, labels_b[:, None], axis=1)[:, 0]
    return loss_b, jnp.argmax(logits_bC - 2e9 * ~real_C[None, :], -1) == labels_b


def infonce_sums(image_BE, text_BE, logit_scale, weights_B) -> dict:
    """CLIP's symmetric InfoNCE: the mean of image->text and text->image
    cross-entropy, each pair's own partner the target among the batch's."""
    logits_BB = _pair_logits(image_BE, text_BE, logit_scale)
    real_B = weights_B > 0
    labels_B = jnp.arange(logits_BB.shape[0])
    i2t_B, i2t_ok = _infonce_rows(logits_BB, labels_B, real_B)
    t2i_B, t2i_ok = _infonce_rows(logits_BB.T, labels_B, real_B)
    return {
        "loss_sum": jnp.sum(weights_B * (i2t_B + t2i_B) / 2),
        "count": jnp.sum(weights_B),
        "correct_i2t": jnp.sum(weights_B * i2t_ok),
        "correct_t2i": jnp.sum(weights_B * t2i_ok),
    }


def sigmoid_sums(image_BE, text_BE, logit_scale, logit_bias, weights_B) -> dict:
    """SigLIP's loss: every (image, text) pair of real rows is a binary
    problem, positive on the diagonal: -log sigmoid(label * logit), summed."""
    logits_BB = _pair_logits(image_BE, text_BE, logit_scale, logit_bias)
    batch = logits_BB.shape[0]
    labels_BB = 2.0 * jnp.eye(batch) - 1.0
    pair_BB = weights_B[:, None] * weights_B[None, :]
    real_B = weights_B > 0
    ok = lambda x: jnp.argmax(x - 2e9 * ~real_B[None, :], -1) == jnp.arange(batch)  # noqa: E731
    return {
        "loss_sum": -jnp.sum(pair_BB * jax.nn.log_sigmoid(labels_BB * logits_BB)),
        "count": jnp.sum(weights_B),
        "correct_i2t": jnp.sum(weights_B * ok(logits_BB)),
        "correct_t2i": jnp.sum(weights_B * ok(logits_BB.T)),
    }


def _batch_axes(batch: int):
    """The mesh's batch axes in the current `jax.set_mesh` context (None when
    there is none, or one device holds the batch: the dense loss is then the
    same computation)."""
    from fmjax.sharding import BATCH_AXES, batch_devices

    return None if batch_devices(batch) == 1 else BATCH_AXES


def infonce_sums_gathered(image_BE, text_BE, logit_scale, weights_B) -> dict:
    """`infonce_sums` written per device (shard_map over the mesh's batch
    axes): each device's rows against all devices' columns (all-gathered, as
    open_clip's `gather_with_grad` + `local_loss`), its [b, B] logits only; the
    sums psum'd. Dense when no mesh splits the batch."""
    axes = _batch_axes(image_BE.shape[0])
    if axes is None:
        return infonce_sums(image_BE, text_BE, logit_scale, weights_B)
    P = jax.sharding.PartitionSpec

    def local(image_bE, text_bE, scale, weights_b):
        gather = lambda x: jax.lax.all_gather(x, axes, tiled=True)  # noqa: E731
        images_BE, texts_BE, real_B = (
            gather(image_bE),
            gather(text_bE),
            gather(weights_b) > 0,
        )
        rows = image_bE.shape[0]
        labels_b = jax.lax.axis_index(axes) * rows + jnp.arange(rows)
        i2t_b, i2t_ok = _infonce_rows(
            _pair_logits(image_bE, texts_BE, scale), labels_b, real_B
        )
        t2i_b, t2i_ok = _infonce_rows(
            _pair_logits(text_bE, images_BE, scale), labels_b, real_B
        )
        sums = {
            "loss_sum": jnp.sum(weights_b * (i2t_b + t2i_b) / 2),
            "count": jnp.sum(weights_b),
            "correct_i2t": jnp.sum(weights_b * i2t_ok),
            "correct_t2i": jnp.sum(weights_b * t2i_ok),
        }
        return jax.lax.psum(sums, axes)

    return jax.shard_map(
        local,
        in_specs=(P(axes), P(axes), P(), P(axes)),
        out_specs=P(),
    )(image_BE, text_BE, logit_scale, weights_B)


def sigmoid_sums_chunked(image_BE, text_BE, logit_scale, logit_bias, weights_B) -> dict:
    """`sigmoid_sums` without the global [B, B] logits (SigLIP's chunked
    loss): each device scores its images against one device's texts at a
    time, [b, b], and passes the texts on around a ring (ppermute), n steps
    for n devices. The texts' best score so far travels with them, so both
    accuracies come out too. Dense when no mesh splits the batch."""
    axes = _batch_axes(image_BE.shape[0])
    if axes is None:
        return sigmoid_sums(image_BE, text_BE, logit_scale, logit_bias, weights_B)
    P = jax.sharding.PartitionSpec

    def local(image_bE, text_bE, scale, bias, weights_b):
        n = jax.lax.psum(1, axes)
        me = jax.lax.axis_index(axes)
        ring = [(i, (i + 1) % n) for i in range(n)]
        rows = image_bE.shape[0]
        # Texts travel with (weights, owner, best image score, best is own image).
        text = (
            text_bE,
            weights_b,
            me,
            jnp.full((rows,), -jnp.inf),
            jnp.zeros(rows, bool),
        )
        img_best = jnp.full((rows,), -jnp.inf)
        img_ok = jnp.zeros(rows, bool)
        loss = 0.0
        for _ in range(n):  # n is static: the mesh's size
            t_bE, t_w, owner, t_best, t_ok = text
            logits_bc = _pair_logits(image_bE, t_bE, scale, bias)
            own = owner == me
            labels_bc = jnp.where(own, 2.0 * jnp.eye(rows) - 1.0, -1.0)
            pair_bc = weights_b[:, None] * t_w[None, :]
            loss = loss - jnp.sum(pair_bc * jax.nn.log_sigmoid(labels_bc * logits_bc))
            masked = jnp.where(t_w[None, :] > 0, logits_bc, -jnp.inf)
            row_max = masked.max(axis=1)
            row_pos = own & (jnp.argmax(masked, axis=1) == jnp.arange(rows))
            img_ok = jnp.where(row_max > img_best, row_pos, img_ok)
            img_best = jnp.maximum(img_best, row_max)
            col = jnp.where(weights_b[:, None] > 0, logits_bc, -jnp.inf)
            col_max = col.max(axis=0)
            col_pos = own & (jnp.argmax(col, axis=0) == jnp.arange(rows))
            t_ok = jnp.where(col_max > t_best, col_pos, t_ok)
            t_best = jnp.maximum(t_best, col_max)
            text = jax.lax.ppermute((t_bE, t_w, owner, t_best, t_ok), axes, ring)
        _, _, _, _, t_ok = text  # home again after n steps
        sums = {
            "loss_sum": loss,
            "count": jnp.sum(weights_b),
            "correct_i2t": jnp.sum(weights_b * img_ok),
            "correct_t2i": jnp.sum(weights_b * t_ok),
        }
        return jax.lax.psum(sums, axes)

    return jax.shard_map(
        local,
        in_specs=(P(axes), P(axes), P(), P(), P(axes)),
        out_specs=P(),
    )(image_BE, text_BE, logit_scale, logit_bias, weights_B)
