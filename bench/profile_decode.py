"""Where a decode step's time goes on this CPU (the numbers behind the decoding
section of docs/benchmarks.md).

Builds the random decoder `fmjax bench decode` builds (default
`gpt_lm:small`, float32), generates `--new-tokens` tokens greedily after a
`--prompt`-token prompt at each batch size, then traces one more generation
under `jax.profiler` and reads back the time of every XLA op of the decode
loop (`jax.profiler.ProfileData`). Prints, per decode step: the number of ops,
the time ops ran, the time by op kind (matmuls, copies, cache updates,
reductions, other fusions) and the longest ops. `--timeline N` also prints N
consecutive ops from the middle of the loop with their start, length and
thread: which ops XLA:CPU ran on both threads at once.

    python bench/profile_decode.py                  # batch 1 and 8
    python bench/profile_decode.py --batch 8 --top 20 --json out.json
    python bench/profile_decode.py --batch 8 --timeline 60
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile

import numpy as np
from profile_step import _union_ns

KINDS = ("matmuls", "copies", "cache updates", "reductions", "other fusions", "other")


def op_kind(op: str) -> str:
    """The kind of an XLA:CPU op from its name in the trace."""
    if op.startswith(("dot", "ynn_fusion", "onednn", "xnn_fusion")):
        return "matmuls"
    if re.fullmatch(r"copy(\.\d+)?", op):
        return "copies"
    if "dynamic-update-slice" in op:
        return "cache updates"
    if "reduce" in op:
        return "reductions"
    if "fusion" in op or op.startswith("wrapped_"):
        return "other fusions"
    return "other"


def random_generator(config_spec: str):
    """(model config, `fmjax bench decode`'s random Generator) of a config."""
    from fmjax.bench_decode import random_generator
    from fmjax.config import load_config
    from fmjax.tasks import task_for

    cfg = task_for(load_config(config_spec), with_data=False).model_config
    return cfg, random_generator(cfg)


def profile(
    cfg, generator, batch: int, prompt: int, new_tokens: int, top: int, timeline=0
):
    import jax

    from fmjax.inference.sampling import Sampling

    rng = np.random.default_rng(0)
    prompts = rng.integers(5, cfg.vocab_size, size=(batch, prompt)).tolist()

    def run():
        *_, tokens = generator.stream_ids(
            prompts, new_tokens, Sampling(), chunk=new_tokens
        )
        return tokens

    run()  # compiles
    run()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    by_op, count, intervals = collections.Counter(), collections.Counter(), []
    events, threads = [], {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op, module = stats.get("hlo_op"), str(stats.get("hlo_module"))
                if op is None or "decode" not in module:
                    continue
                by_op[op] += event.duration_ns
                count[op] += 1
                intervals.append((event.start_ns, event.end_ns))
                thread = threads.setdefault(line.name, len(threads))
                events.append((event.start_ns, event.duration_ns, thread, op))
    steps = new_tokens - 1
    us = lambda ns: ns / steps / 1e3  # noqa: E731
    by_kind, kind_count = collections.Counter(), collections.Counter()
    for op, ns in by_op.items():
        by_kind[op_kind(op)] += ns
        kind_count[op_kind(op)] += count[op]
    return {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "ops_per_step": sum(count.values()) / steps,
        "op_time_us_per_step": us(_union_ns(intervals)),
        "by_kind_us": {k: us(by_kind[k]) for k in KINDS},
        "by_kind_ops": {k: kind_count[k] / steps for k in KINDS},
        "top_ops_us": {op: us(ns) for op, ns in by_op.most_common(top)},
        "timeline": _window(events, timeline),
    }


def _window(events, length: int) -> list[dict]:
    """`length` consecutive ops from the middle of the trace: start (us from
    the first of them), length (us) and thread (numbered in order seen)."""
    events = sorted(e for e in events if not e[3].startswith("while"))
    window = events[len(events) // 2 :][:length]
    return [
        {"start_us": (s - window[0][0]) / 1e3, "us": d / 1e3, "thread": t, "op": op}
        for s, d, t, op in window
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt_lm.py:small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--timeline", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    cfg, generator = random_generator(args.config)
    results = []
    for batch in args.batch:
        r = profile(
            cfg, generator, batch, args.prompt, args.new_tokens, args.top,
            args.timeline,
        )  # fmt: skip
        results.append(r)
        print(
            f"batch {batch}: {r['ops_per_step']:.0f} ops a step, ops ran "
            f"{r['op_time_us_per_step']:.0f} us a step"
        )
        for kind in KINDS:
            print(
                f"  {kind:14s} {r['by_kind_us'][kind]:7.1f} us  "
                f"({r['by_kind_ops'][kind]:.0f} ops)"
            )
        print("  longest ops: " + ", ".join(
            f"{op} {t:.1f} us" for op, t in r["top_ops_us"].items()
        ))  # fmt: skip
        for e in r["timeline"]:
            print(
                f"  {e['start_us']:8.1f} us  {e['us']:6.1f} us  "
                f"thread {e['thread']}  {e['op']}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
