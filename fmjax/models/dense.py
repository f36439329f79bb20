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

import contextlib
import contextvars
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

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


@flax.struct.dataclass
class ColumnParts:
    """A kernel kept as separate arrays: its [inputs, outputs] matrix (input
    dims flattened into one axis, output dims into the other) cut into
    consecutive column ranges. `EinsumDense` computes one [rows, inputs] x
    [inputs, part] product per part and joins them. Decoding on XLA:CPU reads
    its kernels this way (`fmjax.inference.generate.Generator`): a step is a
    chain of products, each waiting for the one before, and XLA:CPU ran each
    on one thread, while a kernel's parts, independent products, ran on both
    (YNNPACK's products at 2+ rows at once; its matrix-vector kernels, at
    one row, only where more than 8 were ready together: its thunk
    executor's split threshold). They must be arrays of their own: slices
    taken inside a jitted function are copies."""

    parts: tuple[Array, ...]
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the kernel's


def column_parts(kernel: Array, parts: int, num_in: int = 1) -> Array | ColumnParts:
    """`kernel`, whose first `num_in` dims are its inputs, as `parts` column
    ranges of its [inputs, outputs] matrix; unchanged where the outputs do
    not divide into `parts` or the kernel is NF4 codes."""
    if is_quantized(kernel) or kernel.ndim < 2:
        return kernel
    matrix = kernel.reshape(int(np.prod(kernel.shape[:num_in])), -1)
    if matrix.shape[1] % parts:
        return kernel
    return ColumnParts(tuple(jnp.split(matrix, parts, axis=1)), tuple(kernel.shape))


@flax.struct.dataclass
class PackedKernel:
    """A float32 kernel's [inputs, outputs] matrix as column panels
    [ceil(outputs / 32), inputs, 32], each a contiguous block (the columns
    past the last output zero), for `fmjax.native.rows_product`: decoding
    1-32 rows on CPU streams each panel once per 8 rows, where XLA:CPU's
    libraries pack the weights again at every product
    (`fmjax.inference.generate.Generator`; docs/benchmarks.md, "Packed
    kernels"). Forward only."""

    panels: Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the kernel's


def pack_kernel(kernel: Array, num_in: int = 1) -> PackedKernel:
    """`kernel`, whose first `num_in` dims are its inputs, as `PackedKernel`."""
    from fmjax.native import PANEL

    matrix = jnp.asarray(kernel, jnp.float32).reshape(
        int(np.prod(kernel.shape[:num_in])), -1
    )
    matrix = jnp.pad(matrix, ((0, 0), (0, -matrix.shape[1] % PANEL)))
    panels = matrix.reshape(matrix.shape[0], -1, PANEL).transpose(1, 0, 2)
    return PackedKernel(panels, tuple(kernel.shape))


# The platform products are traced for (`products_for`); None: JAX's default.
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fmjax_products_platform", default=None
)


@contextlib.contextmanager
def products_for(platform: str):
    """Traces `EinsumDense` products within for `platform` ("cpu", "tpu",
    ...), where it is not the default backend's: a TPU plan compiled on
    this host (`fmjax compile`). See `product_by_parts`. JAX caches traces
    by function, not by this setting: a function traced for one platform
    and traced again for another may keep its first form (the same values,
    another speed), so the train and eval steps jit a function of their
    own per mesh (`fmjax.train.step`)."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def matrix_products() -> bool:
    """Whether products are traced as 2-D ones (`product_by_parts`)."""
    return (_PLATFORM.get() or jax.default_backend()) == "cpu"


def matrix_equation(equation: str) -> int | None:
    """n where `equation` is 'rows + inputs, inputs + outputs -> rows +
    outputs' with n input dims (an `EinsumDense` kernel's form); else None."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    n = len(rhs) - len(rhs.lstrip(lhs))  # the kernel's leading, contracting dims
    if n and lhs.endswith(rhs[:n]) and out == lhs[: len(lhs) - n] + rhs[n:]:
        return n
    return None


def product_by_parts(product, equation: str, x: Array, kernel, bias=None):
    """`product(equation, x, kernel)` (+ `bias`, the output dims' shape) as
    2-D products: x's leading dims flattened into rows and its contracting
    dims (its last) into one, the kernel as its [inputs, outputs] matrix, or
    for `ColumnParts` one product per part, joined; the result given the
    equation's output shape. A single row is a vector: XLA:CPU copied each
    part's [1, n] product through a bitcast of its own.

    Why 2-D: the kernel's gradient contracts x's leading dims ([B, L, D]
    against [B, L, F]: B and L), and XLA:CPU computes a product contracting
    several dims after copying an operand into a canonical layout, here the
    larger one ([F, B*L] for an MLP's up projection); as [B*L, D] against
    [B*L, F] it reads both where they lie (`clip:small` 0.88x the step's
    time, docs/performance.md). Whole kernels only where products are traced
    for XLA:CPU (`matrix_products`): a TPU lays [B, L, D] out in tiles of its
    last two dims, and `vit_mae:base`'s plan took 8% more temporaries with
    2-D products. An NF4 kernel, or an equation of another form, keeps its
    einsum."""
    n = matrix_equation(equation)
    if not isinstance(kernel, ColumnParts | PackedKernel):
        if n is None or is_quantized(kernel) or not matrix_products():
            y = product(equation, x, kernel)
            if bias is None:
                return y
            # Explicit leading 1s: the project runs with rank promotion disabled.
            return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        kernel = column_parts(kernel, 1, n)  # the whole [inputs, outputs] matrix
    elif n is None:
        raise ValueError(
            f"kernel parts need an equation 'batch + inputs, inputs + outputs -> "
            f"batch + outputs'; got {equation!r}"
        )
    if isinstance(kernel, PackedKernel):
        from fmjax.native import rows_product

        inputs, columns = kernel.panels.shape[1], int(np.prod(kernel.shape[n:]))
        y = rows_product(x.reshape(-1, inputs), kernel.panels, columns)
        vector = False
    else:
        rows = x.reshape(-1, kernel.parts[0].shape[0])
        vector = rows.shape[0] == 1
        step = "j,jk->k" if vector else "ij,jk->ik"
        rows = rows[0] if vector else rows
        ys = [product(step, rows, part) for part in kernel.parts]
        y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, -1)
    if bias is not None:  # its gradient then sums the rows of a 2-D array
        y = y + (bias.reshape(-1) if vector else bias.reshape(1, -1))
    return y.reshape(*x.shape[: x.ndim - n], *kernel.shape[n:])


def split_kernels(params, parts, axes: dict[str, tuple]):
    """`params` with every `EinsumDense` kernel laid out as `parts` says
    (`PartCounts`, `Packed`, or a function giving a count of
    `column_parts`). `axes`: the logical axes by "/"-joined path
    (`fmjax.models.registry.param_axes`), which say a kernel's input dims; a
    kernel not in it, or of NF4 codes, stays whole."""
    layout = getattr(parts, "layout", None) or (
        lambda x, num_in: column_parts(x, parts(x), num_in)
    )

    def split(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        is_kernel = getattr(path[-1], "key", None) == "kernel" and name in axes
        if not is_kernel or is_quantized(x):
            return x
        return layout(x, kernel_num_in(axes[name], name))

    return jax.tree_util.tree_map_with_path(split, params, is_leaf=is_quantized)


class PartCounts(NamedTuple):
    """Parts per kernel: one per 64 KiB of it, within [fewest, most]."""

    fewest: int
    most: int

    def __call__(self, kernel) -> int:
        return min(self.most, max(self.fewest, kernel.nbytes >> 16))

    def layout(self, kernel, num_in: int = 1):
        return column_parts(kernel, self(kernel), num_in)


class Packed(NamedTuple):
    """float32 kernels as `PackedKernel`s; others as `otherwise` lays them
    out (None: whole)."""

    otherwise: PartCounts | None

    def layout(self, kernel, num_in: int = 1):
        if not is_quantized(kernel) and kernel.dtype == jnp.float32:
            return pack_kernel(kernel, num_in)
        if self.otherwise is None:
            return kernel
        return self.otherwise.layout(kernel, num_in)


PACKED_ROWS = (1, 32)  # the rows decoded with `Packed` kernels, where built


def decoding_parts(
    rows: int, param_bytes: int, float32: bool = True
) -> PartCounts | Packed | None:
    """How decoding `rows` rows on XLA:CPU reads each kernel, or None (whole).
    A model computed in `float32`: 1 to 32 rows `Packed` where
    `fmjax.native` builds here (one row only where the params take at most
    64 MiB: no second copy of a big model's kernels). Otherwise one row,
    params at most 64 MiB: 4 to 16 parts (gpt_lm:small's query, key and
    value in 4 each, 12 products ready at once; its MLP kernels and head in
    16); 4+ rows: 2 (docs/benchmarks.md)."""
    from fmjax.native import rows_product_available

    if rows == 1:
        parts = PartCounts(4, 16) if param_bytes <= 64 << 20 else None
    else:
        parts = PartCounts(2, 2) if rows >= 4 else None
    low, high = PACKED_ROWS
    packs = low <= rows <= high and (rows > 1 or parts is not None)
    if float32 and packs and rows_product_available():
        return Packed(parts)
    return parts


def _frozen_or_param(module: nn.Module, name: str, init_fn, shape, dtype):
    """The param `name`, or the NF4 QuantizedTensor or `ColumnParts` stored
    under that name (flax's `param` would compare their shapes with the
    logical shape)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_quantized(value) or isinstance(value, ColumnParts | PackedKernel):
            return value
    return module.param(name, init_fn, shape, dtype)


def _dense_einsum(equation: str, x, kernel, dtype):
    """einsum(x, kernel) in `dtype`; an NF4 kernel goes through
    `_quantized_einsum`, which never keeps its dequantised copy, and a 2-D
    product traced for XLA:CPU through `rows_product`."""
    if is_quantized(kernel):
        return _quantized_einsum(equation, jnp.dtype(dtype).name, x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if equation == "ij,jk->ik" and matrix_products():
        return rows_product(x, kernel)
    return jnp.einsum(equation, x, kernel)


@jax.custom_jvp
def rows_product(x: Array, kernel: Array) -> Array:
    """x [rows, inputs] @ kernel [inputs, outputs]. Where the kernel has more
    inputs than outputs (an MLP's down projection), its gradient is computed
    as its transpose, [outputs, inputs]: both are x and the output gradient
    contracted over their rows, which XLA:CPU gives Eigen, and Eigen made the
    one whose last dim is the larger faster (`vit_mae:small`'s step 0.95x,
    docs/performance.md, "Kernel gradients"). XLA folds a transpose of a
    product's result back into the product, so an optimization barrier
    stands between them. A custom JVP, not a VJP: forward-mode autodiff
    (`jax.jvp`) still works, the kernel's tangent taking the same route."""
    return x @ kernel


@functools.partial(rows_product.defjvp, symbolic_zeros=True)
def _rows_product_jvp(primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y, terms = x @ kernel, []
    if not isinstance(dx, SymbolicZero):
        terms.append(dx @ kernel)
    if not isinstance(dkernel, SymbolicZero):  # a frozen kernel takes no route
        if kernel.shape[0] > kernel.shape[1]:
            dkernel = jax.lax.optimization_barrier(dkernel.T).T
        terms.append(x @ dkernel)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


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
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros, self.kernel_axes[self.num_in :]
                ),
                self.kernel_shape[self.num_in :],
                self.param_dtype,
            ).astype(self.dtype)
        return product_by_parts(
            lambda eq, a, k: _dense_einsum(eq, a, k, self.dtype),
            self.equation,
            x,
            kernel,
            bias,
        )


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
