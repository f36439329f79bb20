"""`fmjax compile`: plan a TPU job from a machine without a TPU.

Compiles the real sharded train step for a TPU slice described by JAX's
topology descriptions (from the `libtpu` wheel, the `[tpu]` extra), then
reports per-chip HBM (arguments, temporaries, outputs) against the chip's
capacity, FLOPs per step, the collectives the compiled HLO runs (bytes per
chip per step), and a roofline estimate of the step time and MFU: the largest
of compute, HBM and ICI communication time, and which of them it is. A config
that does not fit raises `DoesNotFitError` with the numbers. As MaxText's
`train_compile`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from fmjax.config import ConfigError
from fmjax.errors import FmjaxError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    chip_config: str  # "megacore" (one device per chip) or "default"
    # bytes/s one chip sends over all its ICI links at once: half the
    # bidirectional per-chip figure the spec sheets give.
    ici_bandwidth: float


GiB = 2**30
# Public Cloud TPU spec sheets (per chip): cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e ("System architecture" tables). ICI, bidirectional per chip:
# v5e 400 GB/s, v5p 1200 GB/s, v6e 800 GB/s; the v4 page gives none, so its
# figure is the page's all-reduce bandwidth per pod over its chips (1.1 PB/s /
# 4096), which is half the bidirectional figure on the v5e and v6e pages too
# (51.2 TB/s / 256 = 400 / 2; 102.4 TB/s / 256 = 800 / 2).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, "megacore", 1.1e15 / 4096),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12, "default", 400e9 / 2),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.76e12, "megacore", 1200e9 / 2),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, "default", 800e9 / 2),
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
        memory = compiled_step_memory(config, mesh, hlo=True)
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
    collectives = collective_stats(memory.pop("hlo_text"), chips)
    ici_bytes = sum(c["ici_bytes"] for c in collectives.values())
    # Roofline: compute time of the per-chip model FLOPs at peak, or of XLA's
    # own count when larger (it covers every op, but a while loop's body, such as
    # chunked attention's or the chunked loss's, only once), HBM traffic of the
    # state, or the collectives' sends at the ICI bandwidth; the largest bounds
    # the step (all three overlapping perfectly: a lower bound on the time).
    times = {
        "compute": max(
            model_flops / (chips * chip.peak_bf16_flops),
            memory["flops"] / chip.peak_bf16_flops,
        ),
        "hbm": hbm / chip.hbm_bandwidth,
        "communication": ici_bytes / chip.ici_bandwidth,
    }
    bound = max(times, key=times.get)
    step_s = times[bound]
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
        "collectives": collectives,
        "ici_bytes_per_chip": ici_bytes,
        "ici_bandwidth": chip.ici_bandwidth,
        "compute_s": times["compute"],
        "hbm_s": times["hbm"],
        "communication_s": times["communication"],
        "bound": bound,
        "roofline_step_s": step_s,
        "roofline_mfu": model_flops / (chips * chip.peak_bf16_flops * step_s),
        "fits": hbm <= chip.hbm_bytes,
    }
    return report


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    unit = r.get("unit", "tokens")
    size = lambda b: gib(b) if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.3g} ms"  # noqa: E731
    moved = [
        f"{kind} {size(c['ici_bytes'])} ({c['count']}x)"
        for kind, c in r["collectives"].items()
        if c["count"]
    ]
    return "\n".join(
        [
            f"{r['config']} on {r['topology']} ({r['chips']} chips, mesh {r['mesh']})",
            f"  HBM per chip: arguments {gib(r['hbm_argument_bytes'])}, temporaries "
            f"{gib(r['hbm_temp_bytes'])}, outputs {gib(r['hbm_output_bytes'])} "
            f"(aliased {gib(r['hbm_alias_bytes'])}) = {gib(r['hbm_total_bytes'])} "
            f"of {gib(r['hbm_capacity_bytes'])} ({r['hbm_fraction']:.0%})",
            f"  FLOPs per step: model {r['model_flops_per_step']:.3e}, "
            f"XLA per chip {r['xla_flops_per_chip']:.3e}",
            f"  ICI sends per chip per step: {', '.join(moved) or 'none'} = "
            f"{size(r['ici_bytes_per_chip'])} at {r['ici_bandwidth'] / 1e9:.0f} GB/s",
            f"  roofline: compute {ms(r['compute_s'])}, HBM {ms(r['hbm_s'])}, "
            f"communication {ms(r['communication_s'])} -> "
            f"{ms(r['roofline_step_s'])}/step, {r['bound']}-bound, "
            f"MFU <= {r['roofline_mfu']:.0%}, "
            f"{r[unit + '_per_step'] / r['roofline_step_s']:.3e} {unit}/s",
        ]
    )


def check_fits(report: dict) -> None:
    if not report["fits"]:
        raise DoesNotFitError(
            "does not fit: " + format_report(report).replace("\n", ";")
        )


# --- collectives in the compiled HLO ----------------------------------------------

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
    r"=%?([\w.\-]+)|\b(branch_computations|called_computations)=\{([^}]*)\}"
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COMPARE = re.compile(r"compare\(%?([\w.\-]+), %?([\w.\-]+)\).*direction=(LT|LE)")
_CONTINUATION = re.compile(r'"async_collective_fusion_config":\{"flag_start":"(-?\d+)"')


def _array_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple counts all its arrays)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = 1 if dtype.startswith("f8") else _DTYPE_BYTES.get(dtype, 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
    """'SHAPE opcode(...), attrs' -> (SHAPE, 'opcode(...), attrs'); a tuple
    shape is parenthesised and may hold spaces."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, in each of the forms XLA prints:
    {{0,1},{2,3}}; [groups,size]<=[N] (iota); mesh['a'=2,'b'=4] {'b'}."""
    groups = re.search(r"replica_groups=(\{\{[^=]*?\}\}|\{\})", attrs)
    if groups:
        first = re.search(r"\{([0-9,\s]*)\}", groups.group(1)[1:])
        members = [m for m in (first.group(1) if first else "").split(",") if m]
        return len(members) or num_devices
    iota = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if iota:
        dims = [int(d) for d in iota.group(1).split(",")]
        return math.prod(dims[1:]) if len(dims) > 1 else dims[0]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    return num_devices


def _trips(while_line: str, computations: dict[str, list[str]]) -> int | None:
    """Iterations of a while loop: XLA's `known_trip_count` when it prints one
    (CPU, GPU), else the bound N of its condition `i < N` (or `i <= N`: N + 1)
    on a constant, the compare at the condition's root or inside the fusion
    there, as in the loops of a `lax.scan` and of XLA:TPU's windowed einsums
    (induction variable from 0 in steps of 1); None when neither."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = computations.get(condition.group(1), []) if condition else []
    constants = {}
    for line in lines:
        match = _INSTRUCTION.match(line)
        value = re.search(r"\sconstant\((-?\d+)\)", line)
        if match and value:
            constants[match.group(1)] = int(value.group(1))
    root = next((line for line in lines if line.lstrip().startswith("ROOT")), "")
    compare = _COMPARE.search(root)
    bound = compare.group(2) if compare else None
    fused = re.search(r"fusion\(([^)]*)\).*calls=%?([\w.\-]+)", root)
    if fused:  # the compare of parameters inside the fusion, mapped to operands
        operands = re.findall(r"%?([\w.\-]+)", fused.group(1))
        inner = computations.get(fused.group(2), [])
        params = {}
        for line in inner:
            match = _INSTRUCTION.match(line)
            index = re.search(r"\sparameter\((\d+)\)", line)
            if match and index:
                params[match.group(1)] = int(index.group(1))
        root = next((line for line in inner if line.lstrip().startswith("ROOT")), "")
        compare = _COMPARE.search(root)
        if compare and compare.group(2) in params:
            bound = operands[params[compare.group(2)]]
    if bound not in constants:
        return None
    return constants[bound] + (compare.group(3) == "LE")


def _traffic(kind: str, result_bytes: int, n: int) -> tuple[int, float]:
    """(bytes of the array the collective works on, bytes each chip sends) for
    one collective over n chips, from its per-chip result size. The sends are
    those of ring algorithms: an all-gather passes on n-1 of its n shards, a
    reduce-scatter n-1 partial shards, an all-reduce does both."""
    if kind == "all-gather":
        return result_bytes, result_bytes * (n - 1) / n
    if kind == "reduce-scatter":
        return result_bytes * n, result_bytes * (n - 1)
    if kind == "all-reduce":
        return result_bytes, 2 * result_bytes * (n - 1) / n
    if kind == "all-to-all":
        return result_bytes, result_bytes * (n - 1) / n
    return result_bytes, float(result_bytes)  # collective-permute: one send


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text, in
    the text's order (callees before their callers, the entry last)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
        elif current and line.startswith(" "):
            computations[current].append(line)
    return computations


def collective_stats(hlo_text: str, num_devices: int) -> dict[str, dict]:
    """Per collective kind, what one step of a compiled (SPMD-partitioned)
    HLO module moves per chip: {"count": executions, "bytes": the arrays they
    work on (an all-gather's gathered result, an all-reduce's or
    reduce-scatter's full operand), "ici_bytes": what each chip sends, as in
    `_traffic`}. Read from the shapes XLA prints after optimisation:

    * an instruction in a while loop counts once per iteration (`_trips`;
      once when the count cannot be read), one in a called or fused
      computation once per call;
    * XLA:TPU splits an async collective into a start, continuations and a
      done, each fusion carrying a copy of the collective: only the start
      (`flag_start` -1) counts; it writes a reduce-scatter as an all-reduce
      inside an `all-reduce-scatter` fusion, counted as the reduce-scatter;
    * `*-start` ops (GPU, CPU) count, `*-done` do not; an all-gather-start's
      result is (operands, results), a collective-permute-start's (operand,
      result, contexts); groups of one chip move nothing.
    """
    computations = hlo_computations(hlo_text)
    order = list(computations)
    # Callers come after their callees in HLO text; walk from the entry back.
    runs = dict.fromkeys(order, 0)
    if order:
        runs[order[-1]] = 1
    for name in reversed(order):
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if not match or not runs[name]:
                continue
            opcode = _split_shape(match.group(2))[1].split("(", 1)[0]
            if opcode in ("async-update", "async-done"):
                continue  # the async-start already runs the computation
            for single_kind, single, _, many in _CALLEES.findall(line):
                times = runs[name]
                if single_kind == "body":
                    times *= _trips(line, computations) or 1
                for callee in [single] if single else re.findall(r"%?([\w.\-]+)", many):
                    if callee in runs and callee != name:
                        runs[callee] += times
    stats = {kind: {"count": 0, "bytes": 0, "ici_bytes": 0.0} for kind in COLLECTIVES}
    for name in order:
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            shape, rest = _split_shape(match.group(2))
            opcode = rest.split("(", 1)[0]
            kind = opcode.removesuffix("-start")
            if kind not in COLLECTIVES or not runs[name]:
                continue
            flag = _CONTINUATION.search(line)
            if flag and flag.group(1) != "-1":
                continue  # a continuation or done of an async collective
            if name.startswith("all-reduce-scatter") and kind == "all-reduce":
                kind = "reduce-scatter"
            if opcode.endswith("-start") and shape.startswith("("):
                parts = _ARRAY.findall(shape)
                if kind == "all-gather":
                    parts = parts[len(parts) // 2 :]
                elif kind == "collective-permute":
                    parts = parts[:1]
                shape = " ".join(f"{d}[{s}]" for d, s in parts)
            n = 1 if kind == "collective-permute" else _group_size(rest, num_devices)
            result = _array_bytes(shape)
            if kind == "reduce-scatter" and name.startswith("all-reduce-scatter"):
                result //= n  # the all-reduce's result is the full operand
            if kind != "collective-permute" and n <= 1:
                continue
            moved, sent = _traffic(kind, result, n)
            entry = stats[kind]
            entry["count"] += runs[name]
            entry["bytes"] += moved * runs[name]
            entry["ici_bytes"] += sent * runs[name]
    return stats
