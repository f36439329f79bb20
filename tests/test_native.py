"""fmjax.native: the few-row product over packed kernels that decoding on
CPU uses (`dense.Packed`), built here with the machine's C++ compiler."""

import logging

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
    monkeypatch.setattr(native, "SOURCE", broken)
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
