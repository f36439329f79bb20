"""Which params train: one bool pytree, and the optimizer built from it.

Paths are the "/"-joined keys of a param tree, e.g.
`layers_0/attention/query/kernel`. A pattern is a regular expression that must
match a whole suffix of the path starting at a "/" boundary: `query/kernel`
matches `layers_0/attention/query/kernel` but not `layers_0/attention/xquery/kernel`;
`layers_[01]/mlp/.*` matches every param under the first two MLPs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import flax.traverse_util
import jax
import numpy as np
import optax

from fmjax.adapt.quant import is_quantized
from fmjax.models.text import count_params as _count_array_params

Patterns = str | Sequence[str]

_TRAIN, _FREEZE = "train", "freeze"


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


def trainable_mask(params, trainable: Callable[[str], bool] | Patterns):
    """A bool tree shaped like `params` (QuantizedTensors are single leaves):
    True where `trainable(path)` holds or a pattern matches the path."""
    if callable(trainable):
        predicate = trainable
    else:
        regex = compile_patterns(trainable, "trainable")
        predicate = lambda path: regex.fullmatch(path) is not None  # noqa: E731
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    mask = {}
    for path in flat:
        value = predicate(path)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"trainable({path!r}) returned {value!r}; expected a bool")
        mask[path] = bool(value)
    return flax.traverse_util.unflatten_dict(mask, sep="/")


def masked_optimizer(
    tx: optax.GradientTransformation, mask
) -> optax.GradientTransformation:
    """`tx` on the leaves where `mask` is True; zero updates elsewhere.

    Frozen leaves carry no optimizer state: `set_to_zero` keeps none and
    `multi_transform` hands `tx` only the trainable leaves. Under jit the
    gradients of frozen leaves are never read, so XLA drops their computation.
    """
    bad = [x for x in jax.tree.leaves(mask) if not isinstance(x, (bool, np.bool_))]
    if bad:
        raise TypeError(f"mask leaves must be bools; got {bad[0]!r}")
    if not any(jax.tree.leaves(mask)):
        raise ValueError("masked_optimizer: the mask marks no param as trainable")
    labels = jax.tree.map(lambda t: _TRAIN if t else _FREEZE, mask)
    return optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, labels)


def count_params(params) -> int:
    """Number of scalars in a param tree; a QuantizedTensor counts its logical size."""
    logical = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )
    return _count_array_params(logical)


def masked_count(params, mask) -> int:
    """Number of scalars in the leaves of `params` where `mask` is True."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat_mask = flax.traverse_util.flatten_dict(mask, sep="/")
    if set(flat) != set(flat_mask):
        raise ValueError(
            f"mask paths differ from params: {sorted(set(flat) ^ set(flat_mask))[:5]}"
        )
    return count_params([leaf for path, leaf in flat.items() if flat_mask[path]])


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
