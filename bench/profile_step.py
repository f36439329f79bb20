"""Where a train step's time goes on this CPU -> docs/performance.md.

For each config (default `gpt_lm:small` and `bert_mlm:small`, batch 32 x 128,
float32, one device), builds fmjax's full optimizer step on random tokens
(`fmjax.bench.fmjax_train_step`, as `fmjax bench train` does), times
`--steps` steps, then traces as many under `jax.profiler` and reads every
XLA op's time back from the trace (`jax.profiler.ProfileData`). Each op is
put in a class from its HLO instruction: the ops it contains (a dot is a
matmul, a gather or scatter an embedding lookup) and its `op_name` metadata,
the source scope it came from (`attention`, `mlp`, `final_norm`,
`cross_entropy`, `optimizer`, ...).

A variant (`--variant NAME=--config.KEY=VALUE,...`) is the same config with
overrides, profiled in the same run right after its base, so a change is
measured before and after on the same machine state; `CONFIG/NAME=...` gives
the variant to the configs whose spec contains CONFIG only.

    python bench/profile_step.py                       # rewrites docs/performance.md
    python bench/profile_step.py \
        --variant gpt_lm/whole=--config.model.max_logits_elements=0 \
        --variant bert_mlm/erfc=--config.model.activation=gelu_erfc
    python bench/profile_step.py --configs configs/clip.py:small --docs ''  # print only
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from studies import REPO, write_results  # noqa: E402

from fmjax.bench_rounds import alternate_rounds  # noqa: E402
from fmjax.host_memory import reexec_with_malloc  # noqa: E402

CONFIGS = ("configs/gpt_lm.py:small", "configs/bert_mlm.py:small")
# Op classes in the order the rules try them (`op_class`).
CLASSES = (
    "matmuls: LM head",
    "matmuls: attention scores",
    "matmuls: projections and MLP",
    "loss: softmax cross-entropy",
    "embedding gather/scatter",
    "attention softmax, masking, reshapes",
    "layer norm and GELU",
    "optimizer update",
    "other (residual adds, copies, ...)",
)
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {"opcode", "op_name", "contains"}} of a compiled
    module's text; `contains` is the set of opcodes in a fusion's body (the
    instruction's own opcode otherwise)."""
    from fmjax.aot import hlo_computations

    bodies, instructions = {}, {}
    for computation, lines in hlo_computations(hlo_text).items():
        bodies[computation] = set()
        for line in lines:
            match = INSTRUCTION.match(line)
            if not match:
                continue
            name, opcode = match.groups()
            bodies[computation].add(opcode)
            op_name = re.search(r'op_name="([^"]*)"', line)
            calls = re.search(r"calls=%([\w.\-]+)", line)
            instructions[name] = {
                "opcode": opcode,
                "op_name": op_name.group(1) if op_name else "",
                "calls": calls.group(1) if calls else "",
            }
    for info in instructions.values():
        info["contains"] = bodies.get(info.pop("calls"), set()) | {info["opcode"]}
    return instructions


def op_class(info: dict) -> str:
    """The CLASSES entry of one HLO instruction (`hlo_instructions`' value)."""
    name, contains = info["op_name"], info["contains"]
    if "/optimizer/" in name or name.endswith("/optimizer"):
        return "optimizer update"
    if {"dot", "convolution"} & contains or "dot_general" in name:
        if "attend" in name or "lm_head" in name or "/head/" in name:
            return "matmuls: LM head"
        if "/attention/" in name and "BSGK" in name:  # q.k and weights.v
            return "matmuls: attention scores"
        return "matmuls: projections and MLP"
    if "cross_entropy" in name:
        return "loss: softmax cross-entropy"
    if {"gather", "scatter"} & contains or "embed" in name:
        return "embedding gather/scatter"
    if "/attention/" in name:
        return "attention softmax, masking, reshapes"
    if "norm" in name or "/mlp/" in name:
        return "layer norm and GELU"
    return CLASSES[-1]


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1.0
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def build(config_spec: str, overrides: list[str]):
    """(run, compiled, config): fmjax's full optimizer step on random tokens
    (random pixels for image configs, random image-caption pairs for dual
    encoders)."""
    from fmjax.bench import fmjax_train_step, random_train_batch
    from fmjax.config import load_config

    config = load_config(config_spec, ["--config.mesh.num_devices=1", *overrides])
    batch = random_train_batch(config)
    run, compiled, _ = fmjax_train_step(config, batch)
    return run, compiled, config


def _unit(config) -> str:
    from fmjax.tasks import task_for

    return task_for(config, with_data=False).throughput_unit


def profile(run, compiled, config, steps: int) -> dict:
    """One traced run of `steps` steps: time by op, op class and gaps."""
    import jax

    instructions = hlo_instructions(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        traced_s = time.perf_counter() - start
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    by_op, intervals = collections.Counter(), []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op in instructions:
                    by_op[op] += event.duration_ns
                    intervals.append((event.start_ns, event.end_ns))
    by_class = collections.Counter()
    for op, ns in by_op.items():
        by_class[op_class(instructions[op])] += ns
    ms = lambda ns: ns / steps / 1e6  # noqa: E731
    top = [
        {"op": op, "class": op_class(instructions[op]),
         "op_name": instructions[op]["op_name"], "ms": ms(ns)}
        for op, ns in by_op.most_common(12)
    ]  # fmt: skip
    return {
        # rows x tokens for text; rows (images, image-caption pairs) otherwise
        "batch": [config.data.batch_size]
        + ([config.data.seq_len] if _unit(config) == "tokens" else []),
        "traced_ms": traced_s / steps * 1e3,
        "ops_running_ms": ms(_union_ns(intervals)),
        "op_thread_ms": ms(sum(by_op.values())),
        "by_class_ms": {c: ms(by_class[c]) for c in CLASSES},
        "top_ops": top,
    }


def report(results: list[dict]) -> str:
    from fmjax.bench import cpu_model

    lines = [
        f"Measured on {cpu_model()} ({os.cpu_count()} cores) by "
        "`python bench/profile_step.py`; float32, one device, random tokens. "
        "ms/step: the median of the rounds (each a few steps; a config's "
        "variants take turns in every round); the other columns come from one "
        "traced run.",
        "",
        "| run | batch | ms/step | all rounds | traced ms/step | an XLA op "
        "running | no op running | op thread-ms |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        idle = r["traced_ms"] - r["ops_running_ms"]
        lines.append(
            f"| {_run_name(r)} | {' x '.join(map(str, r['batch']))} | "
            f"{r['wall_ms']:.0f} | {' '.join(f'{x:.0f}' for x in r['wall_ms_rounds'])} "
            f"| {r['traced_ms']:.0f} | {r['ops_running_ms']:.0f} "
            f"| {idle:.0f} | {r['op_thread_ms']:.0f} |"
        )
    lines += [
        "",
        "Time by op class, thread-milliseconds per step (XLA runs independent "
        "ops on both cores at once, so a row can add up to more than the wall "
        "time) and share of all op time:",
        "",
        "| op class | " + " | ".join(_run_name(r) for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for name in CLASSES:
        cells = []
        for r in results:
            ms = r["by_class_ms"][name]
            cells.append(f"{ms:.0f} ({ms / r['op_thread_ms']:.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for r in results:
        lines += ["", f"Slowest ops of {_run_name(r)}:", ""]
        lines += ["| op | class | source scope | ms/step |", "|---|---|---|---:|"]
        for t in r["top_ops"][:8]:
            scope = t["op_name"].removeprefix("jit(train_step)/")
            lines.append(f"| `{t['op']}` | {t['class']} | `{scope}` | {t['ms']:.1f} |")
    return "\n".join(lines) + "\n"


def _run_name(result: dict) -> str:
    name = result["config"].split("/")[-1].replace(".py", "")
    return f"`{name}` {result['variant']}" if result.get("variant") else f"`{name}`"


def main() -> int:
    # As the `fmjax` command: XLA's temporaries kept mapped (fmjax.host_memory).
    reexec_with_malloc(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="per round and traced")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variant", action="append", default=[],
        help="[CONFIG/]NAME=--config.KEY=VALUE[,...]: also profile each config "
        "(or only those whose spec contains CONFIG) so",
    )  # fmt: skip
    parser.add_argument(
        "--docs", default=os.path.join(REPO, "docs"),
        help="the folder whose performance.md gets the results ('': none, "
        "the results only printed)",
    )  # fmt: skip
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.docs and not os.path.isdir(args.docs):
        parser.error(
            f"--docs {args.docs!r} is not a folder; expected the folder that "
            "holds performance.md, or '' to write no doc"
        )
    variants = [("", "", [])]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        only, _, name = name.rpartition("/")
        variants.append((only, name, [o for o in overrides.split(",") if o]))
    results = []
    for config in args.configs:
        built = {}
        mine = [(n, o) for only, n, o in variants if only in config]
        for name, overrides in mine:
            print(f"compiling {config} {name}".rstrip(), flush=True)
            built[name] = build(config, overrides)
        # ms/step: the variants take turns, so all see the same machine state.
        steppers = {name: run for name, (run, _, _) in built.items()}
        rounds = alternate_rounds(steppers, 3, args.steps, args.rounds)
        for name, overrides in mine:
            print(f"profiling {config} {name}".rstrip(), flush=True)
            ms = [s * 1e3 for s in rounds[name]]
            results.append({
                "config": config, "variant": name, "overrides": overrides,
                "wall_ms": statistics.median(ms), "wall_ms_rounds": ms,
                **profile(*built[name], args.steps),
            })  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.docs:
        doc = os.path.join(args.docs, "performance.md")
        write_results(doc, "Performance", report(results))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
