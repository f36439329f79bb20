"""NF4 quantisation (fmjax.adapt.quant, QLoRA's frozen base): round trips,
packed sizes, the NF4 matmul against a NumPy reference, and rows decoded
alone; the tree-level quantisation is in tests/test_adapt.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.adapt import quant
from fmjax.models import dense

_GAP = np.diff(quant.NF4_CODES).max()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error(double_quant):
    w = jax.random.normal(jax.random.key(0), (256, 257))  # not whole blocks
    q = quant.quantize_nf4(w, 64, double_quant)
    w_hat = quant.dequantize_nf4(q)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    err = np.abs(np.asarray(w_hat) - np.asarray(w))
    assert err.mean() / np.abs(w).mean() < 0.1, err.mean() / np.abs(w).mean()
    flat = np.pad(np.asarray(w).ravel(), (0, (-w.size) % 64)).reshape(-1, 64)
    absmax_N = np.abs(flat).max(axis=1)
    used_N = np.asarray(quant.block_absmax(q))
    if double_quant:  # stored absmax is rounded up, by less than one 8-bit step
        step_G = np.repeat(np.asarray(q.absmax_scale), quant.ABSMAX_GROUP)
        assert np.all(used_N >= absmax_N * (1 - 1e-6))
        assert np.all(used_N - absmax_N <= step_G[: len(absmax_N)] * 1.0001)
    else:
        np.testing.assert_array_equal(used_N, absmax_N)
    bound = (_GAP / 2 * used_N * (1 + 1e-6))[:, None]
    err_NB = np.pad(err.ravel(), (0, (-w.size) % 64)).reshape(-1, 64)
    assert np.all(err_NB <= bound)


def test_nf4_codes_times_scale_round_trip_exactly():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 16, size=(8, 64))
    index[:, 0] = rng.choice([0, 15], size=8)  # a +-1 sets each block's absmax
    scale_N1 = rng.uniform(0.01, 10, size=(8, 1)).astype(np.float32)
    w = quant.NF4_CODES[index] * scale_N1
    q = quant.quantize_nf4(jnp.asarray(w), 64, double_quant=False)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_nf4(q)), w)
    # Rows of W values (here the whole 8 x 64 array, the shortest trailing block
    # of >= 256 values): value i and i + W/2 of a row share a byte.
    assert q.row_size == 512
    packed = np.asarray(q.codes)
    rows = index.reshape(-1, 512)
    np.testing.assert_array_equal(
        packed, ((rows[:, :256] << 4) | rows[:, 256:]).ravel()
    )


def _numpy_dequantize(q):
    row = q.row_size
    packed = np.asarray(q.codes).reshape(-1, row // 2)
    index = np.concatenate([packed >> 4, packed & 15], axis=1).ravel()
    absmax_N = np.asarray(q.absmax, np.float32)
    if q.double_quant:
        codes_GA = absmax_N.reshape(-1, quant.ABSMAX_GROUP)
        absmax_N = codes_GA * np.asarray(q.absmax_scale)[:, None]
        absmax_N = (absmax_N + np.asarray(q.absmax_offset)[:, None]).ravel()
    values_NB = quant.NF4_CODES[index].reshape(-1, q.block_size)
    values = (values_NB * absmax_N[: len(values_NB), None]).ravel()
    return values[: np.prod(q.shape)].reshape(q.shape)


def test_nf4_matmul_matches_numpy_reference():
    w = jax.random.normal(jax.random.key(1), (96, 80)) * 0.02
    x = jax.random.normal(jax.random.key(2), (4, 96))
    q = quant.quantize_nf4(w)
    y = jax.jit(lambda x, q: x @ quant.dequantize_nf4(q))(x, q)
    want = np.asarray(x, np.float64) @ _numpy_dequantize(q).astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_nf4_packed_size():
    w = jnp.zeros((1024, 1024), jnp.float32)
    n, blocks = w.size, w.size // 64
    q = quant.quantize_nf4(w, 64, double_quant=True)
    # 4 bits a value, one uint8 absmax a block, f32 scale + offset per 256 blocks.
    assert quant.nbytes(q) == n // 2 + blocks + 8 * (blocks // 256) == 541_184
    assert quant.nbytes(q) / w.nbytes <= 1 / 7  # 0.1290, i.e. 4.129 bits a value
    q_single = quant.quantize_nf4(w, 64, double_quant=False)
    assert quant.nbytes(q_single) == n // 2 + 4 * blocks


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_rows_decode_alone(double_quant):
    """An NF4 embedding lookup decodes only the rows it reads, to the values the
    whole table decodes to; a table whose rows span code rows is refused."""
    table = jax.random.normal(jax.random.key(3), (300, 512))
    q = quant.quantize_nf4(table, 64, double_quant)
    ids = jnp.asarray([[0, 299, 7], [7, 150, 1]])
    rows = quant.dequantize_rows(q, ids, jnp.float32)
    assert rows.shape == (2, 3, 512)
    np.testing.assert_array_equal(rows, np.asarray(quant.dequantize_nf4(q))[ids])
    layer = dense.Embed(300, 512, ("vocab", "embed"))
    looked_up = layer.apply({"params": {"embedding": q}}, ids)
    np.testing.assert_array_equal(looked_up, rows)
    narrow = quant.quantize_nf4(table[:, :64], 64, double_quant)  # 256-value rows
    with pytest.raises(ValueError, match=r"\(300, 64\)"):
        quant.dequantize_rows(narrow, ids)
    np.testing.assert_array_equal(  # the lookup falls back to the whole table
        layer.clone(features=64).apply({"params": {"embedding": narrow}}, ids),
        np.asarray(quant.dequantize_nf4(narrow))[ids],
    )
