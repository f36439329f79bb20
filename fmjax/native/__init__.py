"""Native CPU kernels for what XLA:CPU's libraries do slowly, compiled for
this machine on first use.

`rows_product(x_MK, panels_PK32, columns)`: a product of a few rows (the
rows being decoded) with a kernel stored as column panels
(`fmjax.models.dense.PackedKernel`): the weights stream through once per
8 rows, where XLA:CPU's product libraries pack them again at every call
(docs/benchmarks.md, "Packed kernels"); `cache_scores` and `cache_values`,
decoding attention's products over a KV cache; `attention`, a training
step's attention and its gradients, one op each way; `layer_norm` and
`activation`, a step's layer norms and MLP activations likewise (XLA:CPU
runs each as several small fusions, mostly on one thread). The sources,
`kernels.cc`, `attention.cc` and `pointwise.cc`, hold XLA FFI handlers;
they are built into one library with the machine's C++ compiler (`$CXX`,
else `c++` or `g++`)
for this CPU (`-march=native`) the first time a process asks for them, and
kept in `~/.cache/fmjax/native` (`$XDG_CACHE_HOME` honoured), keyed by the
sources, compiler, flags, jaxlib and CPU, so a machine builds them once.
Where there is no compiler, the build fails, or `FMJAX_NATIVE=0` is set,
`rows_product_available()` is False (the failure logged once) and callers
keep XLA's products.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "kernels.cc", HERE / "attention.cc", HERE / "pointwise.cc")
HEADERS = (HERE / "common.h",)
TARGET = "fmjax_rows_gemm"  # the FFI targets' names and their handlers
HANDLERS = {
    TARGET: "FmjaxRowsGemm",
    "fmjax_cache_scores": "FmjaxCacheScores",
    "fmjax_cache_values": "FmjaxCacheValues",
    "fmjax_attention_fwd": "FmjaxAttentionForward",
    "fmjax_attention_bwd": "FmjaxAttentionBackward",
    "fmjax_layer_norm_fwd": "FmjaxLayerNormForward",
    "fmjax_layer_norm_bwd": "FmjaxLayerNormBackward",
    "fmjax_activation_fwd": "FmjaxActivationForward",
    "fmjax_activation_slope": "FmjaxActivationSlope",
}
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2}  # pointwise.cc's Kind
PANEL = 32  # columns per panel: kernels.cc's kPanel
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> str:
    """The lines of /proc/cpuinfo that say what -march=native builds for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({x for x in lines if x.split(":")[0].strip() in keys}))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "fmjax" / "native"


def _build(compiler: str) -> Path:
    """The shared library, built unless this machine has it already."""
    include = jax.ffi.include_dir()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [*(x.read_text() for x in SOURCES + HEADERS), version, " ".join(FLAGS)]
            + [jax.__version__, _cpu()]
        ).encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a name of its own, then renamed: processes that build at
    # once (pytest workers) each install a whole library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", partial]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(
                f"{' '.join(command)} exited {out.returncode}:\n{out.stderr[-2000:]}"
            )
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def rows_product_available() -> bool:
    """Whether `rows_product` runs here: on a CPU backend, with the library
    built (or found) and registered with XLA. Decided once per process."""
    if os.environ.get("FMJAX_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (CXX, c++, g++): fmjax.native's ops stay XLA's")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for target, symbol in HANDLERS.items():
            handler = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, handler, platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure: XLA's products instead
        log.warning("fmjax.native: %s; its ops stay XLA's", e)
        return False
    return True


def _require() -> None:
    if not rows_product_available():
        raise RuntimeError(
            "fmjax.native's kernels are not built here (no C++ compiler, a failed "
            "build, FMJAX_NATIVE=0 or not a CPU backend; the log says which)"
        )


def _one_device() -> bool:
    """No mesh of several devices in the `jax.set_mesh` context: XLA cannot
    split a custom op over devices."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def _runs_here() -> bool:
    """What every native op needs: one device, traced for this CPU (matrix
    products not planned for another backend), the kernels built."""
    from fmjax.models.dense import matrix_products

    return _one_device() and matrix_products() and rows_product_available()


def cache_attention_fits(q_NRK: jax.Array, cache_NSK: jax.Array) -> bool:
    """Whether `cache_scores` (queries) and `cache_values` (probabilities)
    take these: float32, at most 8 queries per cache row (decoding), head
    dims a multiple of 16, on one device, traced for this CPU with the
    kernels built."""
    return (
        q_NRK.dtype == cache_NSK.dtype == jnp.float32
        and q_NRK.shape[1] <= 8
        and cache_NSK.shape[2] % 16 == 0
        and _runs_here()
    )


def cache_scores(q_NRK: jax.Array, keys_NSK: jax.Array) -> jax.Array:
    """scores [N, R, S]: each of the R queries of cache row n against its S
    keys (XLA's "NRK,NSK->NRS"), the N rows shared out to the threads."""
    _require()
    out = jax.ShapeDtypeStruct((*q_NRK.shape[:2], keys_NSK.shape[1]), jnp.float32)
    return jax.ffi.ffi_call("fmjax_cache_scores", out)(q_NRK, keys_NSK)


def cache_values(probs_NRS: jax.Array, values_NSK: jax.Array) -> jax.Array:
    """out [N, R, K]: the probability-weighted values of each cache row
    (XLA's "NRS,NSK->NRK")."""
    _require()
    out = jax.ShapeDtypeStruct((*probs_NRS.shape[:2], values_NSK.shape[2]), jnp.float32)
    return jax.ffi.ffi_call("fmjax_cache_values", out)(probs_NRS, values_NSK)


def rows_product(x_MK: jax.Array, panels_PKC: jax.Array, columns: int) -> jax.Array:
    """x [M, K] @ W [K, columns] in float32, W given as its column panels
    [ceil(columns / 32), K, 32] (`fmjax.models.dense.pack_kernel`). Needs
    `rows_product_available()`; forward only (it has no derivative)."""
    _require()
    rows, inputs = x_MK.shape
    if panels_PKC.shape != (-(-columns // PANEL), inputs, PANEL):
        raise ValueError(
            f"panels {panels_PKC.shape} do not fit x {x_MK.shape} and "
            f"{columns} columns; expected {(-(-columns // PANEL), inputs, PANEL)}"
        )
    out = jax.ShapeDtypeStruct((rows, columns), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(
        x_MK.astype(jnp.float32), panels_PKC.astype(jnp.float32)
    )


def attention_fits(q_BLHK: jax.Array, k_BSGK: jax.Array) -> bool:
    """Whether `attention` takes these: float32, head dims 16 to 64 in
    steps of 16, whole query groups, traced for this CPU with the kernels
    built, on one device (XLA cannot split the op over a mesh's devices;
    there the attention stays XLA's)."""
    heads, groups, head_dim = q_BLHK.shape[2], k_BSGK.shape[2], q_BLHK.shape[3]
    return (
        q_BLHK.dtype == k_BSGK.dtype == jnp.float32
        and head_dim % 16 == 0
        and head_dim <= 64
        and heads % groups == 0
        and _runs_here()
    )


def attention(q_BLHK, k_BSGK, v_BSGK, mask_B1LS) -> jax.Array:
    """softmax(q.k / sqrt(K), masked) . v -> [B, L, H, K], as
    `fmjax.models.attention.attention_probs` and `attend_values` compute it
    (GQA where k, v have G < H heads; masked scores float32's lowest), in one
    op, and its gradients in another (`jax.custom_vjp`; no forward-mode
    derivative). Keeps the probabilities [B, H, L, S] for the backward pass."""
    _require()
    q_BLHK = q_BLHK * jnp.asarray(q_BLHK.shape[-1] ** -0.5, q_BLHK.dtype)
    batch, length = q_BLHK.shape[:2]
    keep_BLS = jnp.broadcast_to(mask_B1LS, (batch, 1, length, k_BSGK.shape[1]))
    return _attention(q_BLHK, k_BSGK, v_BSGK, keep_BLS[:, 0].astype(jnp.uint8))


@jax.custom_vjp
def _attention(q, k, v, keep):
    return _attention_fwd(q, k, v, keep)[0]


def _attention_fwd(q, k, v, keep):
    batch, length, heads, _ = q.shape
    probs = jax.ShapeDtypeStruct((batch, heads, length, k.shape[1]), jnp.float32)
    like_q = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    out, probs = jax.ffi.ffi_call("fmjax_attention_fwd", (like_q, probs))(q, k, v, keep)
    return out, (q, k, v, keep, probs)


def _attention_bwd(residuals, dout):
    q, k, v, keep, probs = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("fmjax_attention_bwd", shapes)(
        q, k, v, keep, probs, dout
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def pointwise_fits(x: jax.Array) -> bool:
    """Whether `layer_norm` and `activation` take x: float32, on one device,
    traced for this CPU with the kernels built."""
    return x.dtype == jnp.float32 and x.size > 0 and _runs_here()


def layer_norm(x, scale, bias, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over x's last axis
    (var the biased variance, as flax's and PyTorch's LayerNorm), in one op,
    and its gradients (x, scale, bias) in another (`jax.custom_vjp`)."""
    _require()
    rows = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    return _layer_norm(rows, scale, bias, float(epsilon)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    stats = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
    like_x = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    y, mean, rstd = jax.ffi.ffi_call(
        "fmjax_layer_norm_fwd", (like_x, stats, stats), vmap_method="sequential"
    )(x, scale, bias, epsilon=np.float32(epsilon))
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, residuals, dy):
    x, scale, mean, rstd = residuals
    shapes = tuple(
        jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, scale, scale)
    )
    return jax.ffi.ffi_call("fmjax_layer_norm_bwd", shapes, vmap_method="sequential")(
        x, scale, mean, rstd, dy
    )


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def activation(x: jax.Array, name: str) -> jax.Array:
    """An MLP's activation (`ACTIVATIONS`: exact GELU, its tanh form, quick
    GELU) in one op, and its gradient in another (`jax.custom_vjp`)."""
    _require()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return _activation(x, ACTIVATIONS[name])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _activation(x, kind):
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    call = jax.ffi.ffi_call("fmjax_activation_fwd", out, vmap_method="broadcast_all")
    return call(x, kind=np.int32(kind))


def _activation_fwd(x, kind):
    """The activation and its slope there, the backward's only residual."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    call = jax.ffi.ffi_call(
        "fmjax_activation_slope", (out, out), vmap_method="broadcast_all"
    )
    return call(x, kind=np.int32(kind))


def _activation_bwd(kind, slope, dy):
    return (dy * slope,)


_activation.defvjp(_activation_fwd, _activation_bwd)


_CALL = re.compile(  # the target, its operands' shapes, an activation's kind
    r'custom_call_target="(fmjax_\w+)".*?operand_layout_constraints=\{(.*?)\}, api_'
    r"(?:.*?kind = (\d+))?"
)
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def custom_call_flops(hlo_text: str) -> float:
    """The multiply-add FLOPs (2 per multiply-add) of the products inside
    this module's `fmjax.native` calls, which XLA's cost analysis does not
    see: `fmjax bench train` adds them to XLA's count of the step."""
    total = 0.0
    for target, operands, kind in _CALL.findall(hlo_text):
        dims = [[int(d) for d in s.split(",") if d] for s in _SHAPE.findall(operands)]
        if target in ("fmjax_attention_fwd", "fmjax_attention_bwd"):
            (batch, length, heads, head_dim), keys = dims[0], dims[1][1]
            products = 2 if target == "fmjax_attention_fwd" else 4
            total += 2.0 * products * batch * heads * length * keys * head_dim
        elif target in ("fmjax_cache_scores", "fmjax_cache_values"):
            (n, r, _), (_, slots, head_dim) = dims[0], dims[1]  # cache [N, S, K]
            total += 2.0 * n * r * slots * head_dim
        elif target == TARGET:
            (rows, inputs), (panels, _, width) = dims[0], dims[1]
            total += 2.0 * rows * inputs * panels * width
        elif target.startswith(("fmjax_layer_norm", "fmjax_activation")):
            total += _xla_flops(target, tuple(dims[0]), int(kind or 0))
    return total


@functools.cache
def _xla_flops(target: str, shape: tuple[int, ...], kind: int) -> float:
    """What XLA's cost analysis counts for the computation that one
    pointwise call (`layer_norm`, `activation`) does in XLA's ops instead
    (elementwise operations count there too), so a step's FLOPs are the same
    with fmjax.native or without."""
    import flax.linen as nn

    from fmjax.models.layers import _xla_activation

    def flops(fn, *shapes):
        args = [jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes]
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0))

    if target.startswith("fmjax_layer_norm"):
        norm = nn.LayerNorm()
        params = norm.init(jax.random.key(0), jnp.zeros(shape))

        def forward(x):
            return norm.apply(params, x)

        def both(x, dy):
            return jax.vjp(lambda x, p: norm.apply(p, x), x, params)[1](dy)

        fwd = flops(forward, shape)
        return fwd if target.endswith("fwd") else flops(both, shape, shape) - fwd
    act = _xla_activation({v: k for k, v in ACTIVATIONS.items()}[kind])
    if target.endswith("fwd"):
        return flops(act, shape)
    # the slope: the forward and backward but for the product dy * slope
    return flops(lambda x, dy: jax.vjp(act, x)[1](dy), shape, shape) - math.prod(shape)
