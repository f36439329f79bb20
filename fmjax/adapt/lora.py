"""LoRA as a separate param tree folded into the frozen kernels inside the step.

The model code is untouched: `apply_lora(base, lora, config)` returns the params
`model.apply` sees, each targeted kernel W replaced by `W + scale * A @ B`
(reshaped to W's shape). Differentiate the loss with respect to `lora` only and
the gradients reach nothing else; at init B = 0, so step 0 is the base model.

Adapters sit at the kernel's module path: `layers_0/attention/query/kernel`
gets `layers_0/attention/query/{lora_a, lora_b}` in the LoRA tree.

Which kernel dims are inputs: the model's kernels put the contracted dims
first (EinsumDense's `num_in`). LoRA views a kernel as [in, out] with
  * 2-D kernels ([D, F], [F, D], ...): in = first dim, out = last;
  * query/key/value [D, H, K]: in = D, out = H*K (first dim is the input);
  * out [H, K, D]: in = H*K, out = D (last dim is the output).
Any other kernel with more than two dims is rejected rather than guessed.

Target patterns: regexes matched against a "/"-aligned suffix of the path (see
`fmjax.adapt.masks`), e.g. "attention/query/kernel" or "layers_1[01]/mlp/.*/kernel".
"""

from __future__ import annotations

import dataclasses
import math

import flax.traverse_util
import jax
import jax.numpy as jnp

from fmjax.adapt.masks import compile_patterns, count_params
from fmjax.adapt.quant import dequantize_nf4, is_quantized

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
_INPUT_FIRST = ("query", "key", "value")
_OUTPUT_LAST = ("out",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale = alpha / r), dropout on the adapter's input features.

    Dropout: PEFT drops entries of the input x of the A projection, one mask per
    token. A weight-merge formulation has no x, so here the mask is drawn over
    A's rows (= input features) once per step and target, scaled by 1/(1-p):
    the same as PEFT's dropout with one mask shared by every token of the batch.
    Same expectation, but the noise is correlated across tokens.
    """

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


def kernel_num_in(path: str, shape: tuple[int, ...]) -> int:
    """How many leading dims of the kernel at `path` are inputs (rule above)."""
    parts = path.split("/")
    if parts[-1] != "kernel" or len(shape) < 2:
        raise ValueError(
            f"LoRA adapts >= 2-D `kernel` params; {path} has shape {tuple(shape)}"
        )
    module = parts[-2] if len(parts) > 1 else ""
    if len(shape) == 2 or module in _INPUT_FIRST:
        return 1
    if module in _OUTPUT_LAST:
        return len(shape) - 1
    raise ValueError(
        f"cannot tell the input dims of {path} with shape {tuple(shape)}: expected a "
        f"2-D kernel or a module named one of {_INPUT_FIRST + _OUTPUT_LAST}"
    )


def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    num_in = kernel_num_in(path, shape)
    return math.prod(shape[:num_in]), math.prod(shape[num_in:])


def lora_targets(params, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """Targeted kernel path -> its (in, out) matrix shape, in path order."""
    regex = compile_patterns(config.targets, "LoraConfig.targets")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    targets = {
        path: _matrix_shape(path, tuple(leaf.shape))
        for path, leaf in sorted(flat.items())
        if regex.fullmatch(path)
    }
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


def init_lora(params, config: LoraConfig, rng: Array, dtype=jnp.float32):
    """Adapters for every targeted kernel: lora_a [in, r], lora_b [r, out] = 0.

    A ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's kaiming_uniform(a=sqrt(5)) default.
    """
    flat = {}
    for i, (path, (n_in, n_out)) in enumerate(lora_targets(params, config).items()):
        bound = 1.0 / math.sqrt(n_in)
        a_IR = jax.random.uniform(
            jax.random.fold_in(rng, i), (n_in, config.rank), dtype, -bound, bound
        )
        module = _module_path(path)
        flat[_join(module, "lora_a")] = a_IR
        flat[_join(module, "lora_b")] = jnp.zeros((config.rank, n_out), dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _adapters(lora_params) -> dict[str, tuple[Array, Array]]:
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


def _deltas(params, lora_params, config, rng, deterministic):
    """Kernel path -> (kernel as an array, scale * A @ B in the kernel's shape)."""
    use_dropout = config.dropout > 0 and not deterministic
    if use_dropout and rng is None:
        raise ValueError("apply_lora: dropout > 0 with deterministic=False needs rng")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for i, (module, (a_IR, b_RO)) in enumerate(_adapters(lora_params).items()):
        path = _join(module, "kernel")
        if path not in flat:
            raise KeyError(f"LoRA adapter {module} has no kernel {path} in params")
        w = flat[path]
        if is_quantized(w):
            w = dequantize_nf4(w)
        n_in, n_out = _matrix_shape(path, tuple(w.shape))
        expected = ((n_in, config.rank), (config.rank, n_out))
        if (a_IR.shape, b_RO.shape) != expected:
            raise ValueError(
                f"LoRA {module}: lora_a {a_IR.shape}, lora_b {b_RO.shape}; expected "
                f"{expected[0]} and {expected[1]} for kernel {tuple(w.shape)}"
            )
        a_IR = a_IR.astype(jnp.float32)
        if use_dropout:
            keep_I = jax.random.bernoulli(
                jax.random.fold_in(rng, i), 1.0 - config.dropout, (n_in,)
            )
            a_IR = jnp.where(keep_I[:, None], a_IR / (1.0 - config.dropout), 0.0)
        delta_IO = jnp.matmul(
            a_IR, b_RO.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        out[path] = (w, (config.scale * delta_IO).reshape(w.shape))
    return flat, out


def apply_lora(
    params,
    lora_params,
    config: LoraConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
):
    """`params` with each adapted kernel W replaced by W + scale * A @ B.

    Quantised targeted kernels are dequantised first; other QuantizedTensors are
    left for `dequantize_tree`. The sum is taken in f32 and cast to W's dtype.
    """
    flat, deltas = _deltas(params, lora_params, config, rng, deterministic)
    for path, (w, delta) in deltas.items():
        flat[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def merge(params, lora_params, config: LoraConfig):
    """The adapters folded into the kernels, for serving (no dropout)."""
    return apply_lora(params, lora_params, config, deterministic=True)


def unmerge(merged, lora_params, config: LoraConfig):
    """Inverse of `merge`: subtracts scale * A @ B from each adapted kernel."""
    flat, deltas = _deltas(merged, lora_params, config, None, True)
    for path, (w, delta) in deltas.items():
        if is_quantized(flat[path]):
            raise ValueError(f"unmerge: {path} is quantised; expected merged arrays")
        flat[path] = (w.astype(jnp.float32) - delta).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def lora_param_paths(lora_params) -> list[str]:
    """Sorted "/"-joined paths of the adapter arrays."""
    return sorted(flax.traverse_util.flatten_dict(lora_params, sep="/"))


def count_lora_params(lora_params) -> int:
    return count_params(lora_params)


def lora_param_count(params, config: LoraConfig) -> int:
    """Adapter size r * (in + out) summed over targets, without allocating them."""
    targets = lora_targets(params, config).values()
    return sum(config.rank * (n_in + n_out) for n_in, n_out in targets)
