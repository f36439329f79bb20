"""Dense layers and embeddings whose weights may be frozen NF4 codes (QLoRA).

`EinsumDense` is every projection of the text, vision and multimodal models
(LoRA wraps its `__call__`: `fmjax.adapt.lora.wrap_matmuls`) and `Embed`
every lookup table. A frozen kernel or embedding may be an NF4
`QuantizedTensor`: it is dequantised inside its own matmul
(`_dense_einsum`), never as a whole tree, and in the backward pass again
from its codes, so at most the kernels of the matmul being computed exist in
full precision at once.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.adapt.quant import (
    NF4_CODES,
    dequantize_nf4,
    dequantize_rows,
    is_quantized,
    rows_are_code_rows,
)
from fmjax.models.axes import kernel_num_in

Array = jax.Array


def normal_init(std: float, axes: tuple[str, ...]):
    """A normal(std) initialiser whose param has these logical axes."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class ColumnParts(NamedTuple):
    """A kernel kept as separate arrays, consecutive slices of its last axis
    (always an output axis): `EinsumDense` computes one product per part and
    joins them. Decoding on XLA:CPU reads its kernels this way
    (`fmjax.inference.generate.Generator`): a step is a chain of [B, D]
    products, each waiting for the one before; XLA:CPU ran each of them on
    one of its threads, and a kernel's parts, independent products, on
    both at once. They must be arrays of their own: slices taken inside a
    jitted function are copies."""

    parts: tuple[Array, ...]


def column_parts(kernel: Array, parts: int) -> Array | ColumnParts:
    """`kernel` as `parts` arrays along its last axis, or unchanged where that
    axis does not divide into `parts` or the kernel is NF4 codes."""
    if is_quantized(kernel) or kernel.ndim < 2 or kernel.shape[-1] % parts:
        return kernel
    return ColumnParts(tuple(jnp.split(kernel, parts, axis=-1)))


def product_by_parts(product, equation: str, kernel):
    """`product(kernel)`; for `ColumnParts`, each part's product joined along
    the output axis that the kernel's last axis becomes in `equation`."""
    if not isinstance(kernel, ColumnParts):
        return product(kernel)
    inputs, out_spec = equation.split("->")
    axis = out_spec.index(inputs.split(",")[1][-1])
    return jnp.concatenate([product(part) for part in kernel.parts], axis=axis)


def split_kernels(params, parts: int):
    """`params` with every `EinsumDense` kernel in `column_parts`."""

    def split(path, x):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        return column_parts(x, parts) if is_kernel else x

    return jax.tree_util.tree_map_with_path(split, params, is_leaf=is_quantized)


def _frozen_or_param(module: nn.Module, name: str, init_fn, shape, dtype):
    """The param `name`, or the NF4 QuantizedTensor or `ColumnParts` stored
    under that name (flax's `param` would compare their shapes with the
    logical shape)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_quantized(value) or isinstance(value, ColumnParts):
            return value
    return module.param(name, init_fn, shape, dtype)


def _dense_einsum(equation: str, x, kernel, dtype):
    """einsum(x, kernel) in `dtype`; an NF4 kernel goes through
    `_quantized_einsum`, which never keeps its dequantised copy."""
    if not is_quantized(kernel):
        return jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype))
    return _quantized_einsum(equation, jnp.dtype(dtype).name, x, kernel)


def _dequantized(q, tie, dtype: str):
    """q's kernel, dequantised only once `tie` (this matmul's input, or in the
    backward pass its output gradient) exists, so no two layers' full-precision
    kernels need to be alive together. An optimization barrier says so to the
    TPU and GPU compilers; XLA:CPU expands barriers before it schedules, so the
    dependence is also real arithmetic (0 * an element of `tie` added to the
    codes and to the 16 NF4 levels they index; a NaN or inf there would reach
    the output through the matmul anyway)."""
    tie, q = jax.lax.optimization_barrier((tie, q))  # TPU and GPU honour it
    zero = 0.0 * jax.lax.stop_gradient(tie.reshape(-1)[0]).astype(jnp.float32)
    q = q.replace(codes=q.codes + zero.astype(q.codes.dtype))  # unpacked after tie
    return dequantize_nf4(q, dtype, levels=jnp.asarray(NF4_CODES) + zero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _quantized_einsum(equation: str, dtype: str, x, q):
    """einsum(x, dequantise(q)) whose backward pass recomputes the kernel from
    the NF4 codes: the residuals are x and q, so at most the kernels of the
    matmul being differentiated exist in full precision at once."""
    return jnp.einsum(equation, x.astype(dtype), _dequantized(q, x, dtype))


def _quantized_einsum_fwd(equation, dtype, x, q):
    return _quantized_einsum(equation, dtype, x, q), (x, q)


def _quantized_einsum_bwd(equation, dtype, residuals, dy):
    x, q = residuals
    w = _dequantized(q, dy, dtype)
    _, vjp = jax.vjp(lambda x: jnp.einsum(equation, x.astype(dtype), w), x)
    (dx,) = vjp(dy)
    # The frozen codes get no gradient (float0 for the integer arrays).
    dq = jax.tree.map(
        lambda a: (
            np.zeros(a.shape, jax.dtypes.float0)
            if jnp.issubdtype(a.dtype, jnp.integer)
            else jnp.zeros_like(a)
        ),
        q,
    )
    return dx, dq


_quantized_einsum.defvjp(_quantized_einsum_fwd, _quantized_einsum_bwd)


class EinsumDense(nn.Module):
    """`einsum(equation, x, kernel) + bias`. The kernel's logical axes say which
    of its dims contract (`fmjax.models.axes.kernel_num_in`); the bias covers the
    others, e.g. kernel [embed, heads, kv] -> bias [heads, kv].
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def num_in(self) -> int:
        return kernel_num_in(self.kernel_axes, self.name or "kernel")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _frozen_or_param(
            self,
            "kernel",
            normal_init(self.init_std, self.kernel_axes),
            self.kernel_shape,
            self.param_dtype,
        )
        y = product_by_parts(
            lambda k: _dense_einsum(self.equation, x, k, self.dtype),
            self.equation,
            kernel,
        )
        if not self.use_bias:
            return y
        bias_shape = self.kernel_shape[self.num_in :]
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(
                nn.initializers.zeros, self.kernel_axes[self.num_in :]
            ),
            bias_shape,
            self.param_dtype,
        )
        # Explicit leading 1s: the project runs with rank promotion disabled.
        bias = bias.reshape((1,) * (y.ndim - bias.ndim) + bias_shape)
        return y + bias.astype(self.dtype)


class Embed(nn.Module):
    """Lookup table [num, D]; the lookup stays in param dtype (it is not a matmul).
    An NF4 table (QLoRA with quantised embeddings) is dequantised where it is read.
    """

    num_embeddings: int
    features: int
    axes: tuple[str, str]
    init_std: float = 0.02
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = _frozen_or_param(
            self,
            "embedding",
            normal_init(self.init_std, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        if is_quantized(self.embedding):  # frozen: no gradient flows to it
            if rows_are_code_rows(self.embedding):  # decode the rows read only
                return dequantize_rows(self.embedding, ids, jnp.float32)
            table = _dequantized(self.embedding, ids, jnp.float32)
            return jnp.take(table, ids, axis=0)
        return jnp.take(self.embedding, ids, axis=0).astype(jnp.float32)

    def attend(self, x_BLD: Array, dtype: Any) -> Array:
        """Tied output logits [B,L,num] in f32 (matmul in `dtype`)."""
        if is_quantized(self.embedding):
            return _dense_einsum("BLD,VD->BLV", x_BLD, self.embedding, dtype).astype(
                jnp.float32
            )
        return jnp.einsum(
            "BLD,VD->BLV",
            x_BLD.astype(dtype),
            self.embedding.astype(dtype),
            preferred_element_type=jnp.float32,
        )
