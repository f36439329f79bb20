"""LoRA: a low-rank path beside each adapted matmul, y = x W + scale * drop(x) A B.

The model code is untouched and the frozen kernel W is never copied: inside
`wrap_matmuls(adapters, config, ...)`, every targeted `EinsumDense` computes
its own einsum and adds `scale * dropout(x) @ A @ B`, with x's input dims and
y's output dims flattened as the kernel's logical axes say
(`fmjax.models.axes.kernel_num_in`). That is PEFT's forward: dropout is drawn
per element of the input activations. At init B = 0, so step 0 is the base
model; differentiate with respect to the adapters only and the gradients
reach nothing else. `merge` folds `scale * A @ B` into the kernels for serving
(and `unmerge` takes it out again).

Adapters sit at the kernel's module path: `layers_0/attention/query/kernel`
gets `layers_0/attention/query/{lora_a [in, r], lora_b [r, out]}`.

Target patterns: regexes matched against a "/"-aligned suffix of the path (see
`fmjax.adapt.masks`), e.g. "attention/query/kernel" or "layers_1[01]/mlp/.*/kernel".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from fmjax.adapt.masks import compile_patterns, count_params
from fmjax.adapt.quant import dequantize_nf4, is_quantized
from fmjax.models.axes import axes_of, matrix_shape

Array = jax.Array

DEFAULT_TARGETS = ("attention/query/kernel", "attention/value/kernel")
# Every projection of a transformer block (PEFT's "all-linear" minus the LM head).
ALL_LINEAR = (
    "attention/query/kernel",
    "attention/key/kernel",
    "attention/value/kernel",
    "attention/out/kernel",
    "mlp/up/kernel",
    "mlp/down/kernel",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), dropout on the adapter's input
    activations (per element, as PEFT's `lora_dropout`), target patterns."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(
                f"LoraConfig.targets={self.targets!r}: expected a tuple of patterns"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"LoraConfig.rank={self.rank!r}: expected a positive int")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r}: expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r}: expected [0, 1)")
        compile_patterns(self.targets, "LoraConfig.targets")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _axes(params, axes):
    """`axes` as given, or read from boxed (`nn.Partitioned`) params."""
    if axes is not None:
        return axes
    found = axes_of(params)
    if not any(found.values()):
        raise ValueError(
            "LoRA needs the params' logical axis names: pass axes="
            "fmjax.models.param_axes(model_config), or boxed params"
        )
    return found


def lora_targets(params, config: LoraConfig, axes=None) -> dict[str, tuple[int, int]]:
    """Targeted kernel path -> its (in, out) matrix shape, in path order.
    `axes`: {path: logical axis names} (default: from boxed params)."""
    axes = _axes(params, axes)
    regex = compile_patterns(config.targets, "LoraConfig.targets")
    flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
    targets = {}
    for path, leaf in sorted(flat.items()):
        if not regex.fullmatch(path):
            continue
        if path.split("/")[-1] != "kernel" or len(leaf.shape) < 2:
            raise ValueError(
                f"LoRA adapts >= 2-D `kernel` params; {path} has shape "
                f"{tuple(leaf.shape)}"
            )
        targets[path] = matrix_shape(axes[path], leaf.shape, path)
    if not targets:
        kernels = [p for p in sorted(flat) if p.endswith("kernel")]
        raise ValueError(
            f"LoraConfig.targets={config.targets} match no param; kernel paths: "
            f"{kernels}"
        )
    return targets


def _module_path(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0] if "/" in kernel_path else ""


def _join(module: str, name: str) -> str:
    return f"{module}/{name}" if module else name


def init_lora(params, config: LoraConfig, rng: Array, axes=None, dtype=jnp.float32):
    """Adapters for every targeted kernel: lora_a [in, r], lora_b [r, out] = 0.

    A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's kaiming_uniform(a=sqrt(5)) default.
    """
    flat = {}
    targets = lora_targets(params, config, axes)
    for i, (path, (n_in, n_out)) in enumerate(targets.items()):
        bound = 1.0 / math.sqrt(n_in)
        a_IR = jax.random.uniform(
            jax.random.fold_in(rng, i), (n_in, config.rank), dtype, -bound, bound
        )
        module = _module_path(path)
        flat[_join(module, "lora_a")] = a_IR
        flat[_join(module, "lora_b")] = jnp.zeros((config.rank, n_out), dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def adapters_by_module(lora_params) -> dict[str, tuple[Array, Array]]:
    """Module path -> (lora_a, lora_b), checking that both are present."""
    flat = flax.traverse_util.flatten_dict(lora_params, sep="/")
    modules: dict[str, dict[str, Array]] = {}
    for path, leaf in flat.items():
        module, _, name = path.rpartition("/")
        if name not in ("lora_a", "lora_b"):
            raise ValueError(f"LoRA param {path}: expected names lora_a / lora_b")
        modules.setdefault(module, {})[name] = leaf
    incomplete = [m for m, ab in modules.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"LoRA modules without both lora_a and lora_b: {incomplete}")
    return {m: (ab["lora_a"], ab["lora_b"]) for m, ab in sorted(modules.items())}


def lora_delta(x, a_IR, b_RO, config: LoraConfig, num_in: int, out_shape, *, rng):
    """scale * dropout(x) @ A @ B for x [..., in dims] -> [..., out dims].
    `rng` None: no dropout (eval, or dropout 0)."""
    from fmjax.models.dense import matrix_products

    lead = x.shape[: x.ndim - num_in]
    # On XLA:CPU rows flattened: B's gradient is one 2-D product, as the
    # kernel's (`dense.product_by_parts`).
    rows = (math.prod(lead),) if matrix_products() else lead
    x_XI = x.reshape(*rows, -1)
    if x_XI.shape[-1] != a_IR.shape[0]:
        raise ValueError(
            f"LoRA input has {x_XI.shape[-1]} features; lora_a is {a_IR.shape}"
        )
    if rng is not None and config.dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - config.dropout, x_XI.shape)
        x_XI = jnp.where(keep, x_XI / (1.0 - config.dropout), 0.0)
    dtype = x.dtype
    h_XR = jnp.einsum("...I,IR->...R", x_XI, a_IR.astype(dtype))
    delta_XO = jnp.einsum("...R,RO->...O", h_XR, b_RO.astype(dtype))
    return (config.scale * delta_XO).reshape(*lead, *out_shape)


@contextlib.contextmanager
def wrap_matmuls(
    lora_params, config: LoraConfig, *, rng: Array | None = None, deterministic=True
):
    """Within this context every `EinsumDense` that has an adapter adds its LoRA
    path to its output (module docstring). Dropout needs `rng` when not
    `deterministic`. Raises if an adapter names a module the model never called."""
    from fmjax.models.dense import EinsumDense

    adapters = adapters_by_module(lora_params)
    use_dropout = config.dropout > 0 and not deterministic
    if use_dropout and rng is None:
        raise ValueError("LoRA dropout > 0 with deterministic=False needs rng")
    index = {module: i for i, module in enumerate(adapters)}
    applied = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, EinsumDense):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        y = next_fun(*args, **kwargs)
        if path not in adapters:
            return y
        applied.add(path)
        a_IR, b_RO = adapters[path]
        out_shape = module.kernel_shape[module.num_in :]
        drop_rng = jax.random.fold_in(rng, index[path]) if use_dropout else None
        delta = lora_delta(
            args[0].astype(module.dtype),
            a_IR,
            b_RO,
            config,
            module.num_in,
            out_shape,
            rng=drop_rng,
        )
        return y + delta.astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
    missing = sorted(set(adapters) - applied)
    if missing:
        raise ValueError(
            f"LoRA adapters {missing[:3]} name modules the model did not call"
        )


def _merged_kernel(w, a_IR, b_RO, config: LoraConfig, sign: float):
    """w +/- scale * A @ B in w's shape (the kernel's inputs lead, so a row-major
    [in, out] matrix reshapes onto it), summed in f32 and cast back."""
    if is_quantized(w):
        w = dequantize_nf4(w)
    if a_IR.shape[0] * b_RO.shape[1] != w.size:
        raise ValueError(
            f"LoRA lora_a {a_IR.shape}, lora_b {b_RO.shape} do not fit kernel "
            f"{tuple(w.shape)}"
        )
    delta_IO = jnp.matmul(
        a_IR.astype(jnp.float32),
        b_RO.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    merged = w.astype(jnp.float32) + sign * config.scale * delta_IO.reshape(w.shape)
    return merged.astype(w.dtype)


def _fold(params, lora_params, config: LoraConfig, sign: float):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for module, (a_IR, b_RO) in adapters_by_module(lora_params).items():
        path = _join(module, "kernel")
        if path not in flat:
            raise KeyError(f"LoRA adapter {module} has no kernel {path} in params")
        if sign < 0 and is_quantized(flat[path]):
            raise ValueError(f"unmerge: {path} is quantised; expected merged arrays")
        flat[path] = _merged_kernel(flat[path], a_IR, b_RO, config, sign)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def merge(params, lora_params, config: LoraConfig):
    """The adapters folded into the kernels, for serving (no dropout). A
    quantised adapted kernel is dequantised first."""
    return _fold(params, lora_params, config, 1.0)


def unmerge(merged, lora_params, config: LoraConfig):
    """Inverse of `merge`: subtracts scale * A @ B from each adapted kernel."""
    return _fold(merged, lora_params, config, -1.0)


def lora_param_paths(lora_params) -> list[str]:
    """Sorted "/"-joined paths of the adapter arrays."""
    return sorted(flax.traverse_util.flatten_dict(lora_params, sep="/"))


def count_lora_params(lora_params) -> int:
    return count_params(lora_params)


def lora_param_count(params, config: LoraConfig, axes=None) -> int:
    """Adapter size r * (in + out) summed over targets, without allocating them."""
    targets = lora_targets(params, config, axes).values()
    return sum(config.rank * (n_in + n_out) for n_in, n_out in targets)
