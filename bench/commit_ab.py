"""One config's train step at two revisions of fmjax, in alternating fresh
processes (the before/after numbers of docs/performance.md).

Checks `--base` (and `--new`, default: this working tree) out into
temporary git worktrees, then runs `--pairs` pairs of processes, base then
new, each with that revision first on PYTHONPATH: it builds the config's
full optimizer step (`bench/profile_step.py`'s `build`, the step `fmjax
bench train` times), runs `--steps` steps and reports the median of all but
the first `--skip` (compilation, first touches of memory). Fresh processes
because each revision is its own import of fmjax; alternating, so both
see the same machine state. Both run with the malloc the `fmjax` command
starts itself with (`fmjax.host_memory`).

    python bench/commit_ab.py --base bc5eec4 --config configs/clip.py:small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from studies import REPO  # noqa: E402

from fmjax.host_memory import malloc_environ  # noqa: E402

CHILD = r"""
import json, os, sys, time
root = os.environ["PYTHONPATH"].split(os.pathsep)[0]
sys.path.insert(0, os.path.join(root, "bench"))
import fmjax
assert fmjax.__file__.startswith(root), (fmjax.__file__, root)
from profile_step import build

run, compiled, _ = build({config!r}, [])
seconds = []
for _ in range({steps}):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
print("RESULT", json.dumps({{"seconds": seconds,
                            "flops": compiled.cost_analysis().get("flops")}}))
"""


def measure(root: str, config: str, steps: int, skip: int) -> dict:
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    env = malloc_environ(env) or env
    code = CHILD.format(config=config, steps=steps)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"the step at {root} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[0].removeprefix("RESULT "))
    ms = [s * 1e3 for s in result["seconds"]]
    return {"ms": statistics.median(ms[skip:]), "all_ms": ms, "flops": result["flops"]}


def worktree(rev: str, into: str) -> str:
    path = os.path.join(into, rev.replace("/", "_"))
    subprocess.run(
        ["git", "-C", REPO, "worktree", "add", "--detach", path, rev],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision before")
    parser.add_argument("--new", default="", help="git revision after (default: ./)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    with tempfile.TemporaryDirectory() as into:
        roots = {"base": worktree(args.base, into)}
        roots["new"] = worktree(args.new, into) if args.new else REPO
        try:
            pairs = []
            for index in range(args.pairs):
                pair = {}
                for side, root in roots.items():
                    pair[side] = measure(root, args.config, args.steps, args.skip)
                    print(
                        f"pair {index}: {side} {pair[side]['ms']:.0f} ms/step "
                        f"({pair[side]['flops'] / 1e9:.1f} GFLOP)",
                        flush=True,
                    )
                pairs.append(pair)
        finally:
            for root in roots.values():
                if root != REPO:
                    subprocess.run(
                        ["git", "-C", REPO, "worktree", "remove", "--force", root],
                        check=False, capture_output=True,
                    )  # fmt: skip
    ratios = [p["new"]["ms"] / p["base"]["ms"] for p in pairs]
    summary = {
        "config": args.config,
        "base": args.base,
        "new": args.new or "working tree",
        "pairs": pairs,
        "ratio_new_over_base": statistics.median(ratios),
        "pair_ratios": ratios,
    }
    print(
        f"new / base: {summary['ratio_new_over_base']:.2f} "
        f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
