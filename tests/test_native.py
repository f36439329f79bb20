"""fmjax.native: the few-row product over packed kernels that decoding on
CPU uses (`dense.Packed`), built here with the machine's C++ compiler."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import native
from fmjax.models import dense

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="a CPU kernel (XLA FFI)"
)


def test_the_kernel_builds_here():
    """The CI machine has a C++ compiler: the library builds (or is found in
    the cache) and registers, so decoding takes the packed path."""
    assert native.rows_product_available()
    assert isinstance(dense.decoding_parts(8, 0), dense.Packed)


@pytest.mark.parametrize(
    "rows, inputs, columns",
    # one row; row blocks of 8 and a rest; columns not a multiple of the
    # 32-column panel; one input; a head's worth of panels shared by threads
    [(1, 16, 32), (3, 64, 33), (8, 256, 1000), (11, 7, 70), (1, 1, 5), (8, 256, 8000)],
)
def test_rows_product_equals_the_matrix_product(rows, inputs, columns):
    rng = np.random.default_rng(rows * 1000 + columns)
    x = rng.standard_normal((rows, inputs)).astype(np.float32)
    w = rng.standard_normal((inputs, columns)).astype(np.float32)
    packed = dense.pack_kernel(jnp.asarray(w))
    assert packed.panels.shape == (-(-columns // 32), inputs, 32)
    got = jax.jit(native.rows_product, static_argnums=2)(x, packed.panels, columns)
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * inputs**0.5)


def test_a_kernel_of_two_input_dims_packs_as_its_matrix():
    """An attention out projection [G, K, D] contracts two dims."""
    kernel = jax.random.normal(jax.random.key(0), (2, 4, 40))
    x = jax.random.normal(jax.random.key(1), (3, 5, 2, 4))
    bias = jnp.arange(40.0)
    packed = dense.pack_kernel(kernel, num_in=2)
    got = dense.product_by_parts(jnp.einsum, "BLGK,GKD->BLD", x, packed, bias)
    want = jnp.einsum("BLGK,GKD->BLD", x, kernel) + bias[None, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got.shape == (3, 5, 40)


def test_mismatched_panels_are_refused():
    with pytest.raises(ValueError, match=r"panels \(2, 8, 32\) do not fit x \(3, 4\)"):
        native.rows_product(jnp.ones((3, 4)), jnp.ones((2, 8, 32)), 40)


def test_without_a_working_compiler_decoding_keeps_xla_products(
    monkeypatch, tmp_path, caplog
):
    """No compiler, a build that fails, or FMJAX_NATIVE=0: not available,
    the reason logged, and the decoding layouts those of XLA's products."""
    build = native.rows_product_available.__wrapped__
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FMJAX_NATIVE", "0")
    assert not build()
    monkeypatch.delenv("FMJAX_NATIVE")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with caplog.at_level(logging.WARNING, logger="fmjax.native"):
        assert not build()
    assert "exited" in caplog.text and "broken.cc" in caplog.text
    assert not list((tmp_path / "fmjax" / "native").glob("*.so"))  # nothing half-built
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fmjax.native"):
        assert not build()
    assert "no C++ compiler" in caplog.text
    monkeypatch.setattr(native, "rows_product_available", lambda: False)
    assert dense.decoding_parts(8, 0) == dense.PartCounts(2, 2)
    assert dense.decoding_parts(2, 0) is None
    assert dense.decoding_parts(1, 0) == dense.PartCounts(4, 16)


@pytest.mark.parametrize(
    "n, r, s, k", [(32, 1, 256, 64), (6, 4, 37, 32), (1, 8, 5, 16)]
)
def test_cache_attention_products_equal_einsum(n, r, s, k):
    """The decoding attention's two products over a KV cache [N, S, K]: one
    query (or a GQA group's) per cache row."""
    rng = np.random.default_rng(n + r + s)
    q, keys, values = (
        jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        for shape in ((n, r, k), (n, s, k), (n, s, k))
    )
    probs = jax.nn.softmax(jnp.einsum("NRK,NSK->NRS", q, keys), -1)
    assert native.cache_attention_fits(q, keys)
    scores = jax.jit(native.cache_scores)(q, keys)
    want = np.einsum("NRK,NSK->NRS", np.float64(q), np.float64(keys))
    np.testing.assert_allclose(np.asarray(scores), want, rtol=0, atol=1e-4)
    out = jax.jit(native.cache_values)(probs, values)
    want = np.einsum("NRS,NSK->NRK", np.float64(probs), np.float64(values))
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5)


def test_attention_over_a_cache_takes_the_kernels_where_they_fit():
    """`attention_probs`/`attend_values` with a cache ("NSK"): the same
    result with the native products (one new token) as with XLA's (a prompt
    of 9 tokens, more queries per row than they take)."""
    from fmjax.models.attention import attend_values, attention_probs

    rng = np.random.default_rng(0)
    batch, heads, groups, k, s = 2, 4, 2, 32, 12
    q = jnp.asarray(rng.standard_normal((batch, 9, heads, k)).astype(np.float32))
    cache = jnp.asarray(rng.standard_normal((2, batch * groups, s, k)), jnp.float32)
    mask = jnp.asarray(rng.random((batch, 1, 9, s)) < 0.7).at[..., 0].set(True)

    def attend(q, mask):
        probs = attention_probs(q, cache[0], mask, "NSK")
        return attend_values(probs, cache[1], "NSK")

    assert native.cache_attention_fits(q[:, :1].reshape(4, 2, k), cache[0])
    assert not native.cache_attention_fits(q.reshape(4, 18, k), cache[0])
    whole = jax.jit(attend)(q, mask)
    for i in range(9):  # each query alone: the native path
        one = jax.jit(attend)(q[:, i : i + 1], mask[:, :, i : i + 1])
        np.testing.assert_allclose(one[:, 0], whole[:, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "batch, length, heads, groups, k",
    [(3, 13, 4, 4, 32), (2, 9, 4, 2, 16), (2, 21, 2, 1, 64)],
)
def test_training_attention_equals_xla_and_so_do_its_gradients(
    batch, length, heads, groups, k
):
    """`native.attention` (one op forward, one backward) against
    `attention_probs` + `attend_values`: GQA, masked keys, a row with every
    key masked (a padding query), values and all three gradients."""
    from fmjax.models.attention import attend_values, attention_probs

    rng = np.random.default_rng(length)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, k)), jnp.float32)
    kv = [
        jnp.asarray(rng.standard_normal((batch, length, groups, k)), jnp.float32)
        for _ in range(2)
    ]
    mask = jnp.asarray(rng.random((batch, 1, length, length)) < 0.8)
    mask = mask.at[0, 0, 1].set(False)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def xla(q, k, v):
        return attend_values(attention_probs(q, k, mask), v)

    def ours(q, k, v):
        return native.attention(q, k, v, mask)

    assert native.attention_fits(q, kv[0])
    np.testing.assert_allclose(
        jax.jit(ours)(q, *kv), jax.jit(xla)(q, *kv), rtol=0, atol=2e-6
    )
    for got, want in zip(
        jax.jit(jax.grad(lambda *a: (ours(*a) * weights).sum(), (0, 1, 2)))(q, *kv),
        jax.jit(jax.grad(lambda *a: (xla(*a) * weights).sum(), (0, 1, 2)))(q, *kv),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_training_attention_stays_xla_where_it_does_not_fit():
    """Over a mesh of several devices (XLA cannot split the op), in another
    dtype, or with head dims it does not take."""
    from fmjax.sharding import make_mesh

    q, k = jnp.ones((2, 4, 4, 32)), jnp.ones((2, 4, 4, 32))
    assert native.attention_fits(q, k)
    assert not native.attention_fits(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert not native.attention_fits(jnp.ones((2, 4, 4, 24)), jnp.ones((2, 4, 4, 24)))
    assert not native.attention_fits(jnp.ones((2, 4, 4, 128)), jnp.ones((2, 4, 4, 128)))
    if jax.device_count() > 1:
        with jax.set_mesh(make_mesh()):
            assert not native.attention_fits(q, k)
            assert not native.cache_attention_fits(q[:, 0], k[:, 0])


def test_the_native_ops_flops_are_counted():
    """XLA's cost analysis does not see inside a custom call; `fmjax bench
    train`'s FLOPs of a step add the native ops' own (bench_vision.step_flops)."""
    q, k = jnp.ones((2, 5, 4, 16)), jnp.ones((2, 7, 2, 16))
    mask = jnp.ones((2, 1, 5, 7), bool)

    def loss(q, k):
        return native.attention(q, k, k, mask).sum()

    text = jax.jit(jax.grad(loss, (0, 1))).lower(q, k).compile().as_text()
    # 2 products forward, 4 backward, each 2 B H L S K
    assert native.custom_call_flops(text) == 6 * 2 * 2 * 4 * 5 * 7 * 16
    x, panels = jnp.ones((3, 64)), jnp.ones((2, 64, 32))
    text = jax.jit(native.rows_product, static_argnums=2).lower(x, panels, 50)
    assert native.custom_call_flops(text.compile().as_text()) == 2 * 3 * 64 * 64


def _layer_norm_xla(x, scale, bias, epsilon=1e-6):
    import flax.linen as nn

    params = {"params": {"scale": scale, "bias": bias}}
    return nn.LayerNorm(epsilon=epsilon).apply(params, x)


@pytest.mark.parametrize(
    "shape",
    # rows of whole vectors; a feature count with a rest of 5 lanes; 3 rows
    # of 20 in a batch; rows over several work items (16384 elements each)
    [(64, 13, 128), (10, 37), (3, 5, 20), (700, 48)],
)
def test_layer_norm_and_its_gradients_equal_flax(shape):
    rng = np.random.default_rng(shape[-1])
    x = jnp.asarray(rng.normal(1.0, 2.0, shape).astype(np.float32))
    scale, bias = (
        jnp.asarray(rng.normal(size=shape[-1]).astype(np.float32)) for _ in "ab"
    )
    w = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    got = jax.jit(native.layer_norm, static_argnums=3)(x, scale, bias, 1e-6)
    np.testing.assert_allclose(got, _layer_norm_xla(x, scale, bias), atol=1e-5)

    def grads(norm):
        return jax.jit(jax.grad(lambda *a: (norm(*a) * w).sum(), (0, 1, 2)))(
            x, scale, bias
        )

    rows = np.prod(shape[:-1])
    ours = grads(lambda *a: native.layer_norm(*a, 1e-6))
    for got, want in zip(ours, grads(_layer_norm_xla), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6 * rows**0.5 * 5, rtol=1e-5)


def _activation_float64(name, x):
    """(y, y') in float64."""
    from scipy.special import erf

    x = x.astype(np.float64)
    if name == "gelu":
        cdf = 0.5 * (1 + erf(x / np.sqrt(2)))
        return x * cdf, cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    if name == "gelu_tanh":
        c = np.sqrt(2 / np.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (
            1 + 3 * 0.044715 * x * x
        )
    s = 1 / (1 + np.exp(-1.702 * x))
    return x * s, s + 1.702 * x * s * (1 - s)


@pytest.mark.parametrize("name", sorted(native.ACTIVATIONS))
@pytest.mark.parametrize("shape", [(5,), (37, 33), (300, 100)])
def test_activations_and_their_gradients_are_float32_accurate(name, shape):
    """Values and slopes within a few float32 roundings of float64's (XLA's
    own ops: within 3.5e-6 of the tanh GELU's slope, for comparison)."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    x.flat[:5] = [-30.0, -9.0, 0.0, 9.0, 30.0]  # the tails and 0
    want, slope = _activation_float64(name, x)
    got = jax.jit(native.activation, static_argnums=1)(jnp.asarray(x), name)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: native.activation(x, name).sum()))(jnp.asarray(x))
    np.testing.assert_allclose(grad, slope, atol=3e-6)
    batched = jax.vmap(lambda x: native.activation(x, name))(jnp.asarray(x)[None])
    np.testing.assert_array_equal(batched[0], got)


def test_the_layer_norm_module_and_the_mlp_take_the_native_ops():
    """fmjax's LayerNorm keeps flax's params (names, init, logical axes) and
    values; in float32 on one device it and the MLP's activation each run as
    one op, its gradients as another."""
    from fmjax.models.layers import LayerNorm, Mlp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 32)).astype(np.float32))
    norm = LayerNorm(epsilon=1e-6)
    variables = norm.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nn_unbox(variables)) == {
        "params": {"scale": (32,), "bias": (32,)}
    }
    assert variables["params"]["scale"].names == ("embed",)
    plain = nn_unbox(variables)["params"]
    np.testing.assert_allclose(
        norm.apply(variables, x),
        _layer_norm_xla(x, plain["scale"], plain["bias"]),
        atol=1e-5,
    )
    mlp = Mlp(mlp_dim=64)
    mlp_vars = mlp.init(jax.random.key(1), x)

    def targets(module, variables):
        loss = lambda v: module.apply(v, x).sum()  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(variables).compile().as_text()
        return set(re.findall(r'custom_call_target="(fmjax_\w+)"', text))

    assert targets(norm, variables) == {"fmjax_layer_norm_fwd", "fmjax_layer_norm_bwd"}
    assert targets(mlp, mlp_vars) == {"fmjax_activation_slope"}
    # params cast to bfloat16 after training (as for serving) still run,
    # computed in float32 as flax computes them
    half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), plain)
    np.testing.assert_allclose(
        norm.apply({"params": half}, x),
        _layer_norm_xla(x, half["scale"], half["bias"]),
        atol=1e-5,
    )


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_the_pointwise_ops_count_the_flops_xla_would():
    """`custom_call_flops` counts a native norm or activation as XLA's cost
    analysis counts the same computation in XLA's ops, so a step's FLOPs do
    not depend on which runs (tests/test_host_devices.py checks a whole
    step). XLA counts a fused module's ops once per fusion that computes
    them, so the count here is each op's gradient compiled on its own."""
    from fmjax.models.layers import _xla_activation

    x, scale = jnp.ones((6, 40)), jnp.ones(40)

    def flops(fn, *args):
        compiled = jax.jit(jax.grad(fn, tuple(range(len(args))))).lower(*args).compile()
        return compiled.cost_analysis()["flops"] + native.custom_call_flops(
            compiled.as_text()
        )

    def ours(x, s):
        return native.activation(native.layer_norm(x, s, s, 1e-6), "gelu").sum()

    act = _xla_activation("gelu")
    xla = flops(lambda x, s: _layer_norm_xla(x, s, s).sum(), x, scale) + flops(
        lambda x: act(x).sum(), x
    )
    assert flops(ours, x, scale) == pytest.approx(xla, rel=0.1)


def test_layer_norm_of_a_large_mean_and_a_small_spread():
    """The variance is the mean square about the mean (two passes), so rows
    far from 0 keep their digits, a feature count off the 16-lane vectors
    included: within 0.02 of float64 where float32's mean is off by 1% of
    the spread (flax's one-pass variance, mean(x^2) - mean^2, is off by
    10^4 here)."""
    rng = np.random.default_rng(3)
    x = (1000.0 + rng.normal(0.0, 0.01, (4, 20))).astype(np.float32)
    ones, zeros = jnp.ones(20), jnp.zeros(20)
    got = native.layer_norm(jnp.asarray(x), ones, zeros, 1e-12)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(got, want, atol=0.02)
