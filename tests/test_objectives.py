"""Objective tests: MLM masking statistics, losses against NumPy, metric sums."""

import functools

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.chunked_loss import chunked_cross_entropy
from fmjax.objectives import (
    mlm_loss,
    mlm_mask,
    next_token_loss,
    summarize,
    weighted_cross_entropy,
)
from fmjax.sharding import positions_per_chunk

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


# ------------------------------------------------------- chunked cross-entropy


def _value_shapes(jaxpr) -> set:
    """Shapes of every value a jaxpr (and each jaxpr inside it) computes."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    shapes |= _value_shapes(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    shapes |= _value_shapes(sub)
    return shapes


def test_chunked_cross_entropy_equals_whole_logits_loss_metrics_and_grads():
    B, L, D, V = 2, 16, 8, 50
    keys = jax.random.split(jax.random.key(0), 5)
    hidden_BLD = jax.random.normal(keys[0], (B, L, D))
    head = {
        "w_DV": jax.random.normal(keys[1], (D, V)),
        "bias_V": jax.random.normal(keys[2], (V,)),
    }

    def logits_fn(h_BCD, head):
        return (
            jnp.einsum("BCD,DV->BCV", h_BCD, head["w_DV"]) + head["bias_V"][None, None]
        )

    # Half the targets are the argmax, so `correct` counts something.
    best_BL = jnp.argmax(logits_fn(hidden_BLD, head), -1)
    random_BL = jax.random.randint(keys[3], (B, L), 0, V)
    targets_BL = jnp.where(jnp.arange(L) % 2 == 0, best_BL, random_BL)
    weights_BL = (jax.random.uniform(keys[4], (B, L)) < 0.7).astype(jnp.float32)

    def whole(hidden, head):
        return weighted_cross_entropy(logits_fn(hidden, head), targets_BL, weights_BL)

    def chunked(hidden, head, chunk_len):
        fn = functools.partial(logits_fn, head=head)
        return chunked_cross_entropy(hidden, fn, targets_BL, weights_BL, chunk_len)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
    (want_loss, want), want_grads = jax.jit(grad(whole))(hidden_BLD, head)
    assert float(want["correct"]) >= 4 and float(want["count"]) < B * L
    # 4 divides L; 5 pads it to 4 chunks of 5 with weight-0 positions; 16 is one.
    for chunk_len in (4, 5, 16):
        run = jax.jit(grad(functools.partial(chunked, chunk_len=chunk_len)))
        (loss, sums), grads = run(hidden_BLD, head)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sums["loss_sum"], want["loss_sum"], rtol=1e-5)
        assert float(sums["correct"]) == float(want["correct"])
        assert float(sums["count"]) == float(want["count"])
        for got, expected in zip(
            jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # The weights' gradient too (loss_sum and count are linear in them).
    def sums_of_weights(chunk_len, weights):
        if chunk_len is None:
            logits = logits_fn(hidden_BLD, head)
            _, sums = weighted_cross_entropy(logits, targets_BL, weights)
        else:
            fn = functools.partial(logits_fn, head=head)
            _, sums = chunked_cross_entropy(
                hidden_BLD, fn, targets_BL, weights, chunk_len
            )
        return sums["loss_sum"] + 3 * sums["count"]

    want_dw = jax.grad(functools.partial(sums_of_weights, None))(weights_BL)
    got_dw = jax.grad(functools.partial(sums_of_weights, 5))(weights_BL)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)

    # Neither pass holds the whole [B, L, V] logits, not even stacked chunk by
    # chunk (a scan's saved residuals): the largest value is one chunk's.
    jaxpr = jax.make_jaxpr(grad(functools.partial(chunked, chunk_len=5)))(
        hidden_BLD, head
    )
    sizes = {s: np.prod(s) for s in _value_shapes(jaxpr.jaxpr)}
    assert max(sizes.values()) == B * 5 * V
    assert any(s[-2:] == (5, V) and size == B * 5 * V for s, size in sizes.items())
    whole_jaxpr = jax.make_jaxpr(grad(whole))(hidden_BLD, head)
    assert (B, L, V) in _value_shapes(whole_jaxpr.jaxpr)


def test_chunked_cross_entropy_on_a_mesh_reduces_the_head_gradient_once():
    """Batch split over 4 x 2 (data x fsdp) devices: each shard sums its head
    gradient over the 4 chunks, so the step all-reduces the same bytes as
    whole logits (not one head gradient per chunk). With a head over
    `max_local_head_elements`, only the data shards keep their own and the
    fsdp pairs reduce every chunk: more communication, the same values."""
    from fmjax import aot
    from fmjax import sharding as shd

    B, L, D, V = 8, 16, 8, 64
    keys = jax.random.split(jax.random.key(1), 4)
    hidden_BLD = jax.random.normal(keys[0], (B, L, D))
    w_DV = jax.random.normal(keys[1], (D, V))
    targets_BL = jax.random.randint(keys[2], (B, L), 0, V)
    weights_BL = (jax.random.uniform(keys[3], (B, L)) < 0.7).astype(jnp.float32)

    def loss(hidden, w, chunk_len, max_local):
        fn = lambda h: jnp.einsum("BCD,DV->BCV", h, w)  # noqa: E731
        if chunk_len is None:
            return weighted_cross_entropy(fn(hidden), targets_BL, weights_BL)[0]
        return chunked_cross_entropy(
            hidden, fn, targets_BL, weights_BL, chunk_len, max_local
        )[0]

    mesh = shd.make_mesh(data=4, fsdp=2)
    P = jax.sharding.PartitionSpec
    with jax.set_mesh(mesh):
        hidden = jax.device_put(hidden_BLD, shd.batch_sharding(mesh, 3))
        w = jax.device_put(w_DV, jax.NamedSharding(mesh, P()))
        runs = {}
        for chunk_len, max_local in ((None, None), (4, None), (4, D * V - 1)):
            fn = functools.partial(loss, chunk_len=chunk_len, max_local=max_local)
            step = jax.jit(jax.value_and_grad(fn, (0, 1)))
            hlo = step.lower(hidden, w).compile().as_text()
            all_reduce = aot.collective_stats(hlo, 8)["all-reduce"]["bytes"]
            runs[chunk_len, max_local] = (step(hidden, w), all_reduce)
    (want_loss, want_grads), want_reduce = runs[None, None]
    for (got_loss, got_grads), _ in runs.values():
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for got, want in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want_reduce >= D * V * 4  # the head's gradient, once
    # A few scalar sums more at most; per chunk it would be 4 head gradients.
    assert runs[4, None][1] - want_reduce <= 16
    assert runs[4, D * V - 1][1] >= want_reduce + 3 * D * V * 4


def test_chunk_length_counts_elements_per_device():
    assert positions_per_chunk(2, 16, 50, 0) == 16  # 0: never chunk
    assert positions_per_chunk(2, 16, 50, 2 * 16 * 50) == 16  # fits whole
    # Room for 5 positions of 2 rows: a power of two, 4.
    assert positions_per_chunk(2, 16, 50, 2 * 5 * 50) == 4
    # Room for 30 of 100 positions: 16 -> 7 chunks, evened out to 15 each.
    assert positions_per_chunk(1, 100, 50, 30 * 50) == 15
    # Without a mesh one device holds all 16 rows; a mesh that splits them
    # over 8 devices leaves 2 on each.
    assert positions_per_chunk(16, 16, 50, 2 * 5 * 50) == 1
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"))
    with jax.set_mesh(mesh):
        assert positions_per_chunk(16, 16, 50, 2 * 5 * 50) == 4
        assert positions_per_chunk(12, 16, 50, 2 * 5 * 50) == 1  # 8 does not divide 12
    # The default lets gpt_lm:base (512 x 1024 x 50257) on 16 chips go 64
    # positions at a time, and leaves gpt_lm:small's 32 x 128 x 8000 whole.
    from fmjax.models.config import TransformerConfig

    default = TransformerConfig.__dataclass_fields__["max_logits_elements"].default
    assert positions_per_chunk(32, 1024, 50257, default) == 64
    assert positions_per_chunk(32, 128, 8000, default) == 128
