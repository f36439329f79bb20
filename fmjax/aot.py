"""`fmjax compile`: plan a TPU job from a machine without a TPU.

Compiles the real sharded train step for a TPU slice described by JAX's
topology descriptions (from the `libtpu` wheel, the `[tpu]` extra), then
reports per-chip HBM (arguments, temporaries, outputs) against the chip's
capacity, FLOPs per step, and a roofline estimate of the step time and MFU. A
config that does not fit raises `DoesNotFitError` with the numbers. As
MaxText's `train_compile`.
"""

from __future__ import annotations

import dataclasses
import math
import os

from fmjax.config import ConfigError
from fmjax.errors import FmjaxError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    chip_config: str  # "megacore" (one device per chip) or "default"


GiB = 2**30
# Public Cloud TPU spec sheets (per chip).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, "megacore"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12, "default"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.76e12, "megacore"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, "default"),
}


class DoesNotFitError(FmjaxError, ValueError):
    pass


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); also accepts 'v5e-16' style names."""
    if ":" in topology:
        kind, _, dims = topology.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
    else:
        kind, _, count = topology.rpartition("-")
        shape = _shape_for_count(kind, int(count)) if count.isdigit() else ()
    if kind not in CHIPS or not shape or min(shape) < 1:
        raise ConfigError(
            f"topology {topology!r}: expected KIND:AxB[xC] or KIND-CHIPS with KIND in "
            f"{sorted(CHIPS)}, e.g. v5e:2x2, v5p:4x4x4, v5p-64"
        )
    return kind, shape


def _shape_for_count(kind: str, chips: int) -> tuple[int, ...]:
    """Slice shapes as Cloud TPU names them (v5p-N counts TensorCores: N/2 chips)."""
    if kind in ("v4", "v5p"):
        chips //= 2
        shape = [1, 1, 1]
        for i in range(int(math.log2(max(chips, 1)))):
            shape[i % 3] *= 2
        return tuple(sorted(shape))
    side = int(math.isqrt(chips))
    if side * side == chips:
        return (side, side)
    return (side, chips // side)


def topology_devices(kind: str, shape: tuple[int, ...]):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Only descriptions are needed: let several compiles run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental.topologies import get_topology_desc
    except ImportError as e:  # pragma: no cover
        raise ConfigError(f"JAX has no topology descriptions: {e}") from None
    dims = tuple(shape) + (1,) * (3 - len(shape))
    host = tuple(min(2, d) for d in dims[:2]) + (1,)
    name = f"{kind}:{'x'.join(map(str, shape))}"
    try:
        return get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=CHIPS[kind].chip_config,
            chips_per_host_bounds=host,
            num_slices=1,
        ).devices
    except Exception as e:
        raise ConfigError(
            f"cannot describe TPU topology {name!r} ({e}); install the [tpu] extra "
            "(pip install -e '.[tpu]', the libtpu wheel)"
        ) from None


def compile_for_topology(config, topology: str) -> dict:
    """Compiles the train step of `config` for `topology`; returns the report."""
    from fmjax import sharding as shd
    from fmjax.bench import compiled_step_memory, train_flops_per_token
    from fmjax.tasks import task_for

    kind, shape = parse_topology(topology)
    chip = CHIPS[kind]
    devices = topology_devices(kind, shape)
    mesh = shd.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices
    )
    try:
        memory = compiled_step_memory(config, mesh)
    except Exception as e:  # XLA's TPU compiler refuses what cannot fit in HBM
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message:
            raise
        detail = message.split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
        detail = detail.rstrip(".")
        raise DoesNotFitError(
            f"{config.get('config_spec', config.name)} does not fit on "
            f"{kind}:{'x'.join(map(str, shape))} ({len(devices)} chips of "
            f"{chip.hbm_bytes / GiB:.2f} GiB HBM, mesh {dict(mesh.shape)}): "
            f"{detail}. Shard more (mesh.fsdp), or lower data.batch_size or "
            "data.seq_len"
        ) from None
    hbm = (
        memory["argument_bytes"]
        + memory["temp_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
    )
    chips = len(devices)
    unit = task_for(config, with_data=False).throughput_unit
    if unit == "tokens":
        units = config.data.batch_size * config.data.seq_len
        model_flops = train_flops_per_token(config.model, config.data.seq_len) * units
    else:  # images: XLA's count of the whole step (attention and heads included)
        units = config.data.batch_size
        model_flops = memory["flops"] * chips
    # Roofline: compute time of the per-chip model FLOPs at peak (XLA's own count
    # covers every op, so it bounds from above), or HBM traffic of the state.
    compute_s = model_flops / (chips * chip.peak_bf16_flops)
    xla_compute_s = memory["flops"] / chip.peak_bf16_flops
    memory_s = hbm / chip.hbm_bandwidth
    step_s = max(compute_s, xla_compute_s, memory_s)
    report = {
        "config": config.get("config_spec", config.name),
        "topology": f"{kind}:{'x'.join(map(str, shape))}",
        "chips": chips,
        "mesh": dict(mesh.shape),
        "hbm_capacity_bytes": chip.hbm_bytes,
        "hbm_argument_bytes": memory["argument_bytes"],
        "hbm_temp_bytes": memory["temp_bytes"],
        "hbm_output_bytes": memory["output_bytes"],
        "hbm_alias_bytes": memory["alias_bytes"],
        "hbm_total_bytes": hbm,
        "hbm_fraction": hbm / chip.hbm_bytes,
        "xla_flops_per_chip": memory["flops"],
        "model_flops_per_step": model_flops,
        "unit": unit,
        f"{unit}_per_step": units,
        "roofline_step_s": step_s,
        "roofline_mfu": model_flops / (chips * chip.peak_bf16_flops * step_s),
        "fits": hbm <= chip.hbm_bytes,
    }
    return report


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"
    unit = r.get("unit", "tokens")
    return "\n".join(
        [
            f"{r['config']} on {r['topology']} ({r['chips']} chips, mesh {r['mesh']})",
            f"  HBM per chip: arguments {gib(r['hbm_argument_bytes'])}, temporaries "
            f"{gib(r['hbm_temp_bytes'])}, outputs {gib(r['hbm_output_bytes'])} "
            f"(aliased {gib(r['hbm_alias_bytes'])}) = {gib(r['hbm_total_bytes'])} "
            f"of {gib(r['hbm_capacity_bytes'])} ({r['hbm_fraction']:.0%})",
            f"  FLOPs per step: model {r['model_flops_per_step']:.3e}, "
            f"XLA per chip {r['xla_flops_per_chip']:.3e}",
            f"  roofline: {r['roofline_step_s'] * 1e3:.1f} ms/step, "
            f"MFU <= {r['roofline_mfu']:.0%}, "
            f"{r[unit + '_per_step'] / r['roofline_step_s']:.3e} {unit}/s",
        ]
    )


def check_fits(report: dict) -> None:
    if not report["fits"]:
        raise DoesNotFitError(
            "does not fit: " + format_report(report).replace("\n", ";")
        )
