"""bench/matmul_floor.py: the products it finds in a step and the einsum it
times each as in PyTorch."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

from matmul_floor import dot_flops, einsum_equation, step_dots  # noqa: E402

CASES = [
    ((6, 5), (5, 3), (((1,), (0,)), ((), ()))),  # x @ w
    ((2, 4, 5), (5, 3), (((2,), (0,)), ((), ()))),  # a projection
    ((2, 4, 5), (2, 4, 3), (((0, 1), (0, 1)), ((), ()))),  # a kernel gradient
    ((2, 4, 3, 5), (2, 6, 3, 5), (((3,), (3,)), ((0, 2), (0, 2)))),  # q . k
    ((3, 2, 4), (2, 3, 4, 5), (((2,), (2,)), ((1, 0), (0, 1)))),  # batch dims apart
]


@pytest.mark.parametrize("lhs,rhs,dims", CASES)
def test_einsum_equation_is_the_dot_general(lhs, rhs, dims):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(lhs).astype(np.float32)
    b = rng.standard_normal(rhs).astype(np.float32)
    want = jax.lax.dot_general(a, b, dims)
    equation = einsum_equation((lhs, rhs, "float32", dims))
    np.testing.assert_allclose(np.einsum(equation, a, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lhs,rhs,dims", CASES)
def test_dot_flops_are_two_per_multiply_add(lhs, rhs, dims):
    (lc, _), (lb, _) = dims
    out = jax.eval_shape(
        lambda a, b: jax.lax.dot_general(a, b, dims),
        jax.ShapeDtypeStruct(lhs, jnp.float32),
        jax.ShapeDtypeStruct(rhs, jnp.float32),
    )
    contracted = np.prod([lhs[i] for i in lc])
    assert dot_flops((lhs, rhs, "float32", dims)) == 2 * out.size * contracted


def test_step_dots_counts_a_scan_body_per_iteration_and_the_backward_pass():
    def loss(w, x):
        def body(h, _):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(body, x, None, length=3)
        return (h @ w).sum()

    w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
    forward = step_dots(jax.make_jaxpr(loss)(w, x).jaxpr)
    assert sum(forward.values()) == 4
    signature = ((2, 4), (4, 4), "float32", (((1,), (0,)), ((), ())))
    assert forward[signature] == 4
    both = step_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(w, x).jaxpr)
    # each forward product, and two in the backward pass: its inputs' gradients
    assert sum(both.values()) == 4 * 3
