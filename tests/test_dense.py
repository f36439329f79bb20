"""`EinsumDense` products as 2-D matrices on XLA:CPU (`dense.product_by_parts`):
the same values and gradients as the einsums, and kernel gradients that
contract one dim."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, assert_trees_close

from fmjax.adapt.lora import LoraConfig, lora_delta
from fmjax.models import dense

sys.path.insert(0, os.path.join(REPO, "bench"))

from matmul_floor import step_dots  # noqa: E402

EQUATIONS = [  # equation, x's shape, kernel's shape and logical axes
    ("BLD,DHK->BLHK", (3, 5, 8), (8, 2, 4), ("embed", "heads", "kv")),
    ("BLHK,HKD->BLD", (3, 5, 2, 4), (2, 4, 8), ("heads", "kv", "embed")),
    ("BD,DN->BN", (3, 8), (8, 6), ("embed", "mlp")),  # pooled features
]


def _dot_operand_ranks(fn, *args) -> list[tuple[int, int, int]]:
    """(lhs rank, rhs rank, contracting dims) of every dot_general in fn's jaxpr."""
    dots = step_dots(jax.make_jaxpr(fn)(*args).jaxpr)
    return [(len(lhs), len(rhs), len(dims[0][0])) for lhs, rhs, _, dims in dots]


def _loss_and_grads(equation, kernel_shape, axes):
    module = dense.EinsumDense(equation, kernel_shape, axes)

    def loss(params, x):
        return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

    return module, jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("equation,x_shape,kernel_shape,axes", EQUATIONS)
def test_matrix_products_equal_einsums_with_one_contracting_dim(
    equation, x_shape, kernel_shape, axes
):
    x = jax.random.normal(jax.random.key(0), x_shape)
    results = {}
    for platform in ("cpu", "tpu"):
        # A function of its own per platform: JAX caches traces by function.
        module, value_and_grad = _loss_and_grads(equation, kernel_shape, axes)
        params = module.init(jax.random.key(1), x)["params"]
        params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
        with dense.products_for(platform):
            results[platform] = value_and_grad(params, x)
            ranks = _dot_operand_ranks(value_and_grad, params, x)
        if platform == "cpu":  # every product 2-D (or a vector), one dim contracted
            assert all(max(r[:2]) <= 2 and r[2] == 1 for r in ranks), ranks
        elif len(x_shape) > 2:  # einsums: the kernel gradient contracts B and L
            assert any(r[2] > 1 for r in ranks), ranks
    assert_trees_close(results["cpu"], results["tpu"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_shape", [(4, 5), (6, 3)])
def test_rows_product_gradients_forward_mode_and_route(kernel_shape):
    x = jax.random.normal(jax.random.key(0), (7, kernel_shape[0]))
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    tangents = (jnp.cos(x), jnp.sin(kernel))
    got = jax.jvp(dense.rows_product, (x, kernel), tangents)
    assert_trees_close(got, jax.jvp(jnp.matmul, (x, kernel), tangents), rtol=1e-5)

    def loss(product):
        return lambda x, kernel: jnp.sum(jnp.sin(product(x, kernel)))

    grads = jax.grad(loss(dense.rows_product), argnums=(0, 1))
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
    assert_trees_close(grads(x, kernel), want, rtol=1e-5, atol=1e-6)
    # More inputs than outputs: the kernel's gradient is made as [outputs,
    # inputs], kept so by a barrier; a frozen kernel's product has none.
    barriers = [
        eqn.invars[0].aval.shape
        for eqn in jax.make_jaxpr(grads)(x, kernel).jaxpr.eqns
        if eqn.primitive.name == "optimization_barrier"
    ]
    assert barriers == (
        [kernel_shape[::-1]] if kernel_shape[0] > kernel_shape[1] else []
    )
    x_grad = jax.grad(loss(dense.rows_product))
    assert "optimization_barrier" not in str(jax.make_jaxpr(x_grad)(x, kernel))


def test_lora_delta_rows_flattened_on_cpu_only():
    config = LoraConfig(rank=2, alpha=4.0)
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    a_IR = jax.random.normal(jax.random.key(1), (8, 2))
    b_RO = jax.random.normal(jax.random.key(2), (2, 6))

    results = {}
    for platform, rank in (("cpu", 2), ("tpu", 3)):

        def loss(a, b, x):  # a function of its own per platform (above)
            return jnp.sum(jnp.sin(lora_delta(x, a, b, config, 1, (6,), rng=None)))

        grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
        with dense.products_for(platform):
            results[platform] = grads(a_IR, b_RO, x)
            ranks = _dot_operand_ranks(grads, a_IR, b_RO, x)
        assert max(max(r[:2]) for r in ranks) == rank, (platform, ranks)
    assert_trees_close(results["cpu"], results["tpu"], rtol=1e-5, atol=1e-6)


def test_products_for_restores_the_default():
    default = dense.matrix_products()
    with dense.products_for("tpu"):
        assert not dense.matrix_products()
        with dense.products_for("cpu"):
            assert dense.matrix_products()
        assert not dense.matrix_products()
    assert dense.matrix_products() == default == (jax.default_backend() == "cpu")
