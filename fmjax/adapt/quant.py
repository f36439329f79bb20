"""NF4 block quantisation of frozen weights (QLoRA, Dettmers et al. 2023).

A tensor is flattened, zero-padded to whole rows of W = max(256, block_size)
values (whole blocks), and each block of `block_size` values is stored as 4-bit
indices into the 16 NF4 levels, scaled by the
block's absmax. Two indices share a byte: value i of a row in the high nibble
and value i + W/2 in the low one. (bitsandbytes pairs adjacent values instead;
decoding those needs a [n, 2] interleave, and any minor dimension under 128
lanes, which a TPU pads to up to 64 times its size. A row decodes as
[rows, W/2]-byte arrays, 128 lanes wide.)

Double quantisation stores the per-block absmax values themselves in 8 bits:
groups of `ABSMAX_GROUP` absmax values are mapped affinely onto 0..255 with one
f32 scale and one f32 offset per group. Codes are rounded *up*, so the stored
absmax is never below the true one and normalised values stay in [-1, 1].
Cost per weight: 4 + 8/64 + 64/(64*256) = 4.129 bits (bitsandbytes: 4.127, with
one global offset instead of one per group).

Everything is jnp, so `dequantize_nf4` runs inside a jitted step: the base
weights stay quantised in memory and each kernel is expanded inside its own
matmul (`fmjax.models.dense.EinsumDense`), never the whole tree at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NF4 levels (bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1)
# normalised to [-1, 1], asymmetric so that 0 is exactly representable.
NF4_CODES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision boundaries: a normalised value maps to the nearest level.
_NF4_MIDPOINTS = (NF4_CODES[:-1] + NF4_CODES[1:]) / 2
ABSMAX_GROUP = 256


@flax.struct.dataclass
class QuantizedTensor:
    """An NF4-quantised array; a pytree whose leaves are the stored arrays.

    codes: uint8 [rows * W // 2], two 4-bit indices per byte (values i and
        i + W/2 of a row of W = max(256, block_size) values).
    absmax: f32 [num_blocks], or with double quantisation uint8
        [num_groups * ABSMAX_GROUP] decoded as `absmax * scale + offset`.
    absmax_scale, absmax_offset: f32 [num_groups], None without double quant.
    dtype: what `dequantize_nf4` returns by default (the original array's dtype,
        or the compute dtype QLoRA asked for).
    """

    codes: Array
    absmax: Array
    absmax_scale: Array | None
    absmax_offset: Array | None
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)
    row: int = flax.struct.field(pytree_node=False, default=256)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def row_size(self) -> int:
        return self.row

    @property
    def num_blocks(self) -> int:
        rows = -(-self.size // self.row_size)
        return rows * self.row_size // self.block_size


def row_size(shape: tuple[int, ...], block_size: int) -> int:
    """Values per row of codes: whole blocks and at least 256 (128 bytes). The
    product of the array's trailing dims when it qualifies, so decoded rows are
    the array's own rows (a [2048, 8192] kernel decodes as [2048, 8192], with no
    relayout); else max(256, block_size) over the flattened, padded array."""
    trailing = 1
    for size in reversed(shape):
        trailing *= size
        if trailing >= 256 and trailing % block_size == 0:
            return trailing
    return max(256, block_size)


def _check_block_size(block_size: int) -> None:
    if (
        not isinstance(block_size, int)
        or block_size < 2
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size={block_size!r}: expected a power of two >= 2 "
            "(two 4-bit codes share a byte)"
        )


def _quantize_absmax(absmax_N: Array) -> tuple[Array, Array, Array]:
    """8-bit affine codes for positive absmax values, rounded up, per group."""
    num = absmax_N.shape[0]
    padded = jnp.pad(absmax_N, (0, (-num) % ABSMAX_GROUP), mode="edge")
    absmax_GA = padded.reshape(-1, ABSMAX_GROUP)
    offset_G = absmax_GA.min(axis=1)
    scale_G = (absmax_GA.max(axis=1) - offset_G) / 255.0
    safe_scale_G1 = jnp.where(scale_G > 0, scale_G, 1.0)[:, None]
    codes_GA = jnp.ceil((absmax_GA - offset_G[:, None]) / safe_scale_G1)
    codes_GA = jnp.clip(codes_GA, 0, 255).astype(jnp.uint8)
    return codes_GA.reshape(-1), scale_G, offset_G


def _dequantize_absmax(q: QuantizedTensor) -> Array:
    if not q.double_quant:
        return q.absmax
    codes_GA = q.absmax.reshape(-1, ABSMAX_GROUP).astype(jnp.float32)
    absmax_GA = codes_GA * q.absmax_scale[:, None] + q.absmax_offset[:, None]
    return absmax_GA.reshape(-1)[: q.num_blocks]


def block_absmax(q: QuantizedTensor) -> Array:
    """f32 [blocks]: the scale each block that holds values is decoded with (the
    padding of the last row adds all-zero blocks)."""
    return _dequantize_absmax(q)[: -(-q.size // q.block_size)]


def quantize_nf4(
    w: Array, block_size: int = 64, double_quant: bool = True, dtype: Any = None
) -> QuantizedTensor:
    """NF4 codes of `w` (any float shape) in blocks of `block_size` values;
    `dtype` (default w's) is what it dequantises to."""
    _check_block_size(block_size)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
        raise ValueError(
            f"quantize_nf4: got {w.dtype} array of shape {w.shape}; "
            "expected a non-empty float array"
        )
    flat = w.reshape(-1).astype(jnp.float32)
    row = row_size(tuple(w.shape), block_size)
    flat = jnp.pad(flat, (0, (-flat.size) % row))
    x_NB = flat.reshape(-1, block_size)
    absmax_N = jnp.abs(x_NB).max(axis=1)
    absmax_scale = absmax_offset = None
    stored_absmax = absmax_N
    if double_quant:
        stored_absmax, absmax_scale, absmax_offset = _quantize_absmax(absmax_N)
        # Normalise by the absmax the decoder will see, not the exact one.
        codes_GA = stored_absmax.reshape(-1, ABSMAX_GROUP).astype(jnp.float32)
        decoded = codes_GA * absmax_scale[:, None] + absmax_offset[:, None]
        absmax_N = decoded.reshape(-1)[: x_NB.shape[0]]
    safe_absmax_N1 = jnp.where(absmax_N > 0, absmax_N, 1.0)[:, None]
    index_NB = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x_NB / safe_absmax_N1)
    index_RW = index_NB.astype(jnp.uint8).reshape(-1, row)
    codes = ((index_RW[:, : row // 2] << 4) | index_RW[:, row // 2 :]).reshape(-1)
    return QuantizedTensor(
        codes=codes,
        absmax=stored_absmax,
        absmax_scale=absmax_scale,
        absmax_offset=absmax_offset,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype if dtype is None else dtype).name,
        block_size=block_size,
        row=row,
    )


def _lookup(levels, index):
    """levels[index] for 4-bit indices as a tree of 15 elementwise selects, one
    bit at a time: it fuses into the dequantising loop, where a gather from the
    16-entry table becomes a materialised one-hot on TPUs."""
    values = [levels[i] for i in range(16)]
    for bit in range(4):
        take_odd = ((index >> bit) & 1).astype(bool)
        values = [
            jnp.where(take_odd, values[2 * k + 1], values[2 * k])
            for k in range(len(values) // 2)
        ]
    return values[0]


def _decode_rows(q: QuantizedTensor, codes_RH, absmax_RK, dtype, levels) -> Array:
    """[R, W] values from R rows of codes and their blocks' absmax."""
    # The 4-bit indices of each row in order: high nibbles, then low ones.
    index_RW = jnp.concatenate([codes_RH >> 4, codes_RH & 0xF], axis=1)
    levels = jnp.asarray(NF4_CODES) if levels is None else levels
    absmax_RW = jnp.repeat(absmax_RK, q.block_size, axis=1)
    # Rounded to the tensor's own dtype (QLoRA's compute dtype) first.
    return (_lookup(levels, index_RW) * absmax_RW).astype(q.dtype).astype(dtype)


def dequantize_nf4(q: QuantizedTensor, dtype: Any = None, levels=None) -> Array:
    """The array `q` encodes, in `dtype` (default: the quantised array's dtype).
    `levels`: the 16 NF4 values to decode with (default `NF4_CODES`)."""
    dtype = q.dtype if dtype is None else dtype
    row, block = q.row_size, q.block_size
    codes_RH = q.codes.reshape(-1, row // 2)
    absmax_RK = _dequantize_absmax(q).reshape(-1, row // block)
    values_RW = _decode_rows(q, codes_RH, absmax_RK, dtype, levels)
    return values_RW.reshape(-1)[: q.size].reshape(q.shape)


def rows_are_code_rows(q: QuantizedTensor) -> bool:
    """Whether each row q.shape[1:] of the array is one row of codes (so rows
    can be decoded alone, e.g. an embedding table's looked-up rows)."""
    return q.row_size == math.prod(q.shape[1:])


def dequantize_rows(q: QuantizedTensor, ids: Array, dtype: Any = None) -> Array:
    """`dequantize_nf4(q)[ids]` decoding only the rows `ids` picks: an NF4
    embedding lookup reads [*ids.shape, D] values, never the whole table."""
    if not rows_are_code_rows(q):
        raise ValueError(
            f"dequantize_rows: rows of {q.shape} span {q.row_size}-value code "
            "rows; expected one code row per array row"
        )
    dtype = q.dtype if dtype is None else dtype
    row, block = q.row_size, q.block_size
    flat = ids.reshape(-1)
    codes_RH = jnp.take(q.codes.reshape(-1, row // 2), flat, axis=0)
    absmax = _dequantize_absmax(q).reshape(-1, row // block)
    absmax_RK = jnp.take(absmax, flat, axis=0)
    values_RW = _decode_rows(q, codes_RH, absmax_RK, dtype, None)
    return values_RW.reshape(*ids.shape, *q.shape[1:])


def nbytes(q: QuantizedTensor) -> int:
    """Bytes held by the stored arrays (codes, absmax and its scale/offset)."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(q)
    )


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


def is_kernel_matrix(path: str, leaf) -> bool:
    return path.split("/")[-1] == "kernel" and jnp.ndim(leaf) >= 2


def is_matrix(path: str, leaf) -> bool:
    """Kernels and embedding tables (not the 2-D [heads, kv] attention biases)."""
    return path.split("/")[-1] in ("kernel", "embedding") and jnp.ndim(leaf) >= 2


def quantize_tree(
    params,
    predicate: Callable[[str, Array], bool] = is_kernel_matrix,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    dtype: Any = None,
):
    """`params` with each leaf where `predicate("/"-joined path, leaf)` holds
    replaced by its QuantizedTensor (default: every >= 2-D `kernel`; embeddings,
    biases and norms stay as they are), dequantising to `dtype` (default: the
    leaf's)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        if predicate(path, leaf):
            if jnp.ndim(leaf) < 2:
                raise ValueError(
                    f"quantize_tree: {path} has shape {jnp.shape(leaf)}; "
                    "expected a matrix (>= 2 dims)"
                )
            leaf = quantize_nf4(leaf, block_size, double_quant, dtype)
        out[path] = leaf
    return flax.traverse_util.unflatten_dict(out, sep="/")


def dequantize_tree(tree, dtype: Any = None):
    """`tree` with every QuantizedTensor replaced by its dequantised array."""
    return jax.tree.map(
        lambda x: dequantize_nf4(x, dtype) if is_quantized(x) else x,
        tree,
        is_leaf=is_quantized,
    )
