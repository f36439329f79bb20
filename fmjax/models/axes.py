"""Logical axis names of params, and which dims of a kernel are its inputs.

Every param is created with logical axis names (`nn.with_logical_partitioning`),
so the names say what each dimension is. This module is the one place that
reads a kernel's input and output dims from them: EinsumDense (which dims its
einsum contracts), LoRA (a kernel seen as an [in, out] matrix), and the HF
converters and PEFT files (a kernel as a torch Linear weight [out, in]) all
call `kernel_num_in`.

Rule: a kernel maps its input dims to its output dims. The attention head
axes ("heads", "kv") always travel together; when a kernel ends with them,
they are its output (query/key/value [embed, heads, kv]), otherwise its last
axis is the output (attention out [heads, kv, embed], MLP [embed, mlp],
heads [embed, vocab]). Everything before the output is input.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import flax.traverse_util
import jax

HEAD_AXES = ("heads", "kv")


def kernel_num_in(names: Sequence[str | None], path: str = "kernel") -> int:
    """How many leading dims of a kernel with logical axis `names` are inputs."""
    names = tuple(names)
    if len(names) < 2:
        raise ValueError(f"{path}: a kernel has >= 2 dims, got logical axes {names}")
    if names[-len(HEAD_AXES) :] == HEAD_AXES and len(names) > len(HEAD_AXES):
        return len(names) - len(HEAD_AXES)
    if any(n in HEAD_AXES for n in names[:-1]) and names[: len(HEAD_AXES)] != (
        HEAD_AXES
    ):
        raise ValueError(
            f"{path}: logical axes {names} split the head axes {HEAD_AXES}; "
            "cannot tell its input dims from its output dims"
        )
    return len(names) - 1


def matrix_shape(
    names: Sequence[str | None], shape: Sequence[int], path: str = "kernel"
) -> tuple[int, int]:
    """(in, out): the kernel seen as a matrix, inputs first (row-major)."""
    num_in = kernel_num_in(names, path)
    n_in = 1
    for size in shape[:num_in]:
        n_in *= size
    n_out = 1
    for size in shape[num_in:]:
        n_out *= size
    return n_in, n_out


def axes_of(boxed_params) -> dict[str, tuple[str | None, ...]]:
    """{"/"-joined path: logical axis names} of a tree of `nn.Partitioned` leaves
    (e.g. `jax.eval_shape(model.init, ...)["params"]`); unboxed leaves get ()."""
    flat = flax.traverse_util.flatten_dict(
        boxed_params,
        sep="/",
        is_leaf=lambda _, x: isinstance(x, nn.Partitioned),
    )
    return {
        path: tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else ()
        for path, leaf in flat.items()
    }


def abstract_params(module, *args, **kwargs):
    """The boxed param tree of `module.init(*args)` as ShapeDtypeStructs."""
    return jax.eval_shape(
        lambda: module.init(jax.random.key(0), *args, **kwargs)["params"]
    )
