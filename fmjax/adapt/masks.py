"""Param paths and the patterns that select them (LoRA targets, the params an
adapter run trains besides its adapter), and param counts.

Which params train is decided by `fmjax.adapt.methods.Adaptation.split`: trained
params and frozen ones are separate trees, so frozen params never get optimizer
state or updates.

Paths are the "/"-joined keys of a param tree, e.g.
`layers_0/attention/query/kernel`. A pattern is a regular expression that must
match a whole suffix of the path starting at a "/" boundary: `query/kernel`
matches `layers_0/attention/query/kernel` but not `layers_0/attention/xquery/kernel`;
`layers_[01]/mlp/.*` matches every param under the first two MLPs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.traverse_util
import jax

from fmjax.adapt.quant import is_quantized
from fmjax.models.text import count_params as _count_array_params

Patterns = str | Sequence[str]


def compile_patterns(patterns: Patterns, what: str = "patterns") -> re.Pattern:
    """One regex matching a path whose "/"-aligned suffix fully matches a pattern."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what}={patterns!r}: expected non-empty regex strings")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what}: pattern {pattern!r} is not a regex: {e}") from e
    alternatives = "|".join(f"(?:{p})" for p in patterns)
    return re.compile(f"(?:.*/)?(?:{alternatives})")


def path_matches(path: str, patterns: Patterns) -> bool:
    return compile_patterns(patterns).fullmatch(path) is not None


def param_paths(params) -> list[str]:
    """ "/"-joined paths of the leaves (a QuantizedTensor counts as one leaf)."""
    return list(flax.traverse_util.flatten_dict(params, sep="/"))


def count_params(params) -> int:
    """Number of scalars in a param tree; a QuantizedTensor counts its logical size."""
    logical = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )
    return _count_array_params(logical)


def trainable_summary(params_trainable, params_all) -> str:
    """PEFT's `print_trainable_parameters` line, e.g.
    `trainable params: 294,912 || all params: 22,713,216 || trainable%: 1.2984`.

    `params_all` is everything the model holds, adapters included (as in PEFT).
    """
    trainable, total = count_params(params_trainable), count_params(params_all)
    if total == 0:
        raise ValueError("trainable_summary: params_all holds no params")
    if trainable > total:
        raise ValueError(
            f"trainable_summary: {trainable:,d} trainable params > {total:,d} in all"
        )
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
