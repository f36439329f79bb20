"""Objective tests: MLM masking statistics, losses against NumPy, metric sums."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.objectives import mlm_loss, mlm_mask, next_token_loss, summarize

VOCAB = 100
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = (PAD, CLS, SEP, MASK)


def _batch(shape=(128, 256), seed=0):
    """Random ordinary tokens with CLS/SEP at the ends and a padded tail per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, size=shape)
    lengths = rng.integers(shape[1] // 2, shape[1] + 1, size=shape[0])
    seg = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    tokens[:, 0] = CLS
    tokens[np.arange(shape[0]), lengths - 1] = SEP
    tokens = np.where(seg == 0, PAD, tokens)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(seg)


@pytest.fixture(scope="module")
def masked():
    tokens, seg = _batch()
    fn = functools.partial(
        mlm_mask, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS
    )
    out = jax.jit(fn)(jax.random.key(0), tokens, seg)
    return np.asarray(tokens), np.asarray(seg), [np.asarray(x) for x in out], fn


def test_mlm_mask_rate_and_split(masked):
    tokens, seg, (inputs, targets, weights), _ = masked
    eligible = (seg != 0) & ~np.isin(tokens, SPECIALS)
    selected = weights > 0
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.01  # ~4 sigma at n~24k
    n = selected.sum()
    masked_frac = (inputs[selected] == MASK).sum() / n
    kept_frac = (inputs[selected] == tokens[selected]).sum() / n
    random_frac = 1 - masked_frac - kept_frac
    # A random draw equal to the original token counts as kept: random ~0.099.
    assert abs(masked_frac - 0.8) < 0.03
    assert abs(random_frac - 0.1) < 0.02
    assert abs(kept_frac - 0.1) < 0.02
    np.testing.assert_array_equal(targets, tokens)
    assert weights.dtype == np.float32 and set(np.unique(weights)) == {0.0, 1.0}


def test_mlm_mask_never_touches_specials_or_padding(masked):
    tokens, seg, (inputs, _, weights), _ = masked
    ineligible = (seg == 0) | np.isin(tokens, SPECIALS)
    assert (weights[ineligible] == 0).all()
    np.testing.assert_array_equal(inputs[weights == 0], tokens[weights == 0])
    replaced = (weights > 0) & (inputs != MASK)
    assert not np.isin(inputs[replaced], SPECIALS).any()


def test_mlm_mask_is_deterministic_per_rng(masked):
    tokens, seg, (inputs, _, weights), fn = masked
    again = fn(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(seg))
    np.testing.assert_array_equal(again[0], inputs)  # eager equals jitted
    np.testing.assert_array_equal(again[2], weights)
    other = fn(jax.random.key(1), jnp.asarray(tokens), jnp.asarray(seg))
    assert not np.array_equal(other[2], weights)


def test_mlm_random_tokens_cover_exactly_the_non_special_ids():
    specials = (0, 5, 50, 99)  # gaps and both ends of the vocabulary
    tokens = jnp.full((64, 128), 7, jnp.int32)
    inputs, _, weights = mlm_mask(
        jax.random.key(3),
        tokens,
        jnp.ones_like(tokens),
        mask_id=0,
        vocab_size=VOCAB,
        special_ids=specials,
        rate=1.0,
        mask_frac=0.0,
        random_frac=1.0,
    )
    assert float(weights.sum()) == tokens.size
    assert set(np.unique(np.asarray(inputs))) == set(range(VOCAB)) - set(specials)


def test_mlm_mask_rejects_bad_arguments():
    tokens = jnp.zeros((1, 4), jnp.int32)
    common = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="random_frac"):
        mlm_mask(
            jax.random.key(0), tokens, tokens, mask_frac=0.9, random_frac=0.2, **common
        )
    with pytest.raises(ValueError, match="special_ids"):
        mlm_mask(
            jax.random.key(0), tokens, tokens, mask_id=3, vocab_size=4, special_ids=(7,)
        )


def _np_nll(logits, targets):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_mlm_loss_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (3, 7, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    weights = (jax.random.uniform(jax.random.key(2), (3, 7)) < 0.5).astype(jnp.float32)
    loss, metrics = jax.jit(mlm_loss)(logits, targets, weights)
    nll, w = _np_nll(logits, np.asarray(targets)), np.asarray(weights)
    np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_sum"], (nll * w).sum(), rtol=1e-5)
    correct = (np.asarray(logits).argmax(-1) == np.asarray(targets)) * w
    assert float(metrics["correct"]) == correct.sum()
    assert float(metrics["count"]) == w.sum()
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_uniform_logits_give_log_vocab():
    targets = jnp.arange(12).reshape(2, 6) % 50
    loss, _ = mlm_loss(jnp.zeros((2, 6, 50), jnp.bfloat16), targets, jnp.ones((2, 6)))
    np.testing.assert_allclose(loss, np.log(50), rtol=1e-6)
    seg = jnp.ones((2, 6), jnp.int32)
    loss, _ = next_token_loss(jnp.zeros((2, 6, 50)), targets, seg)
    np.testing.assert_allclose(loss, np.log(50), rtol=1e-6)


def test_all_zero_weights_give_zero_loss_and_finite_grads():
    logits = jnp.ones((1, 3, 5))
    grad_fn = jax.grad(
        lambda x: mlm_loss(x, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))[0]
    )
    assert (
        float(mlm_loss(logits, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))[0]) == 0
    )
    assert np.isfinite(grad_fn(logits)).all()


SEG = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)


def test_next_token_loss_matches_numpy_within_segments():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 9)) * 2
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 9)
    loss, metrics = jax.jit(next_token_loss)(logits, tokens, jnp.asarray(SEG))
    lg, tk = np.asarray(logits), np.asarray(tokens)
    nll = []
    for b in range(2):
        for t in range(5):
            if SEG[b, t + 1] == SEG[b, t] != 0:
                nll.append(_np_nll(lg[b, t], tk[b, t + 1]))
    # Row 0: 0->1, 1->2, 3->4 (2->3 crosses documents, 4->5 is padding); row 1: 5.
    assert len(nll) == 8 and float(metrics["count"]) == 8
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_sum"], np.sum(nll), rtol=1e-5)


def test_next_token_loss_counts_only_targets_the_loss_mask_marks():
    """A prompt-completion segment: loss_mask 1 on the completion's tokens, so
    only positions predicting them count (as NumPy over those pairs)."""
    logits = jax.random.normal(jax.random.key(0), (2, 6, 9)) * 2
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 9)
    mask = np.array([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]], np.int32)
    loss, metrics = next_token_loss(logits, tokens, jnp.asarray(SEG), jnp.asarray(mask))
    lg, tk = np.asarray(logits), np.asarray(tokens)
    nll = [
        _np_nll(lg[b, t], tk[b, t + 1])
        for b in range(2)
        for t in range(5)
        if SEG[b, t + 1] == SEG[b, t] != 0 and mask[b, t + 1]
    ]
    # Row 0: 1->2 and 3->4; row 1: 2->3, 3->4, 4->5.
    assert len(nll) == 5 and float(metrics["count"]) == 5
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)
    ones = jnp.ones_like(tokens)
    np.testing.assert_array_equal(
        next_token_loss(logits, tokens, jnp.asarray(SEG), ones)[0],
        next_token_loss(logits, tokens, jnp.asarray(SEG))[0],
    )


def test_next_token_loss_ignores_cross_segment_and_padding_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 9))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 9)
    seg = jnp.asarray(SEG)
    base = next_token_loss(logits, tokens, seg)[0]
    # Position 2 predicts into document 2, 4 into padding, 5 has no next token.
    noisy = logits.at[0, jnp.array([2, 4, 5])].set(50.0)
    np.testing.assert_allclose(next_token_loss(noisy, tokens, seg)[0], base, rtol=1e-6)
    changed = tokens.at[0, 3].set((tokens[0, 3] + 1) % 9)  # target of position 2
    np.testing.assert_allclose(
        next_token_loss(logits, changed, seg)[0], base, rtol=1e-6
    )
    assert float(next_token_loss(noisy.at[0, 1].set(50.0), tokens, seg)[0]) != float(
        base
    )


def test_summarize_math_and_exact_aggregation():
    s = summarize(
        {
            "loss_sum": np.float32(6.0),
            "correct": np.float32(3.0),
            "count": np.float32(4.0),
        }
    )
    assert float(s["loss"]) == 1.5 and float(s["accuracy"]) == 0.75
    np.testing.assert_allclose(s["perplexity"], np.exp(1.5), rtol=1e-6)

    logits = jax.random.normal(jax.random.key(0), (4, 8, 13))
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 13)
    seg = jnp.asarray(
        np.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 3 + [2] * 5, [1] * 8])
    )
    loss_fn = jax.jit(next_token_loss)
    whole = summarize(loss_fn(logits, tokens, seg)[1])
    halves = [
        loss_fn(logits[i : i + 2], tokens[i : i + 2], seg[i : i + 2])[1] for i in (0, 2)
    ]
    summed = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), *halves)
    merged = summarize(summed)  # numpy path
    for key in ("loss", "accuracy", "perplexity", "count"):
        np.testing.assert_allclose(merged[key], whole[key], rtol=1e-6)
    # The mean of per-half mean losses is not the batch loss (unequal counts).
    per_half = [float(summarize(h)["loss"]) for h in halves]
    assert float(halves[0]["count"]) != float(halves[1]["count"])
    assert abs(np.mean(per_half) - float(whole["loss"])) > 1e-4
