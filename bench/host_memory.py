"""Train steps under each `FMJAX_MALLOC` setting -> docs/performance.md.

The `fmjax` command starts itself with jemalloc (where installed), which
keeps XLA:CPU's per-step temporaries mapped from step to step, or with
glibc's huge-page tunable, so that they fault in 2 MiB at a time
(`fmjax.host_memory`). Both are read when a process starts, so each config
runs in fresh processes, the settings (`--settings`: `jemalloc`,
`huge_pages` and `system`, glibc's defaults) taking turns (`--repeats` times
each).
Each process builds the config's full optimizer step
(`bench/profile_step.py`'s `build`), runs `--warmup` steps, then times
`--steps` steps and counts their minor page faults and kernel CPU time
(`getrusage`).

    python bench/host_memory.py                      # the four small configs
    python bench/host_memory.py --configs configs/clip.py:small --repeats 3
    MALLOC_CONF=narenas:1 python bench/host_memory.py --settings jemalloc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from studies import REPO  # noqa: E402

from fmjax.host_memory import ENV, malloc_environ  # noqa: E402

CONFIGS = (
    "configs/gpt_lm.py:small",
    "configs/bert_mlm.py:small",
    "configs/vit_mae.py:small",
    "configs/clip.py:small",
)
SETTINGS = ("jemalloc", "huge_pages", "system")
# what a setting adds; a process starts without it (a MALLOC_CONF of your own
# is kept: other jemalloc settings are tried so)
DROPPED = ("GLIBC_TUNABLES", "LD_PRELOAD")

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
from profile_step import build

run, _, _ = build({config!r}, [])
for _ in range({warmup}):
    run()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}):
    run()
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{
    "ms_per_step": seconds / {steps} * 1e3,
    "faults_per_step": (after.ru_minflt - before.ru_minflt) / {steps},
    "kernel_s_per_step": (after.ru_stime - before.ru_stime) / {steps},
    "user_s_per_step": (after.ru_utime - before.ru_utime) / {steps},
    "max_rss_mib": after.ru_maxrss / 1024,
}}))
"""


def measure(config: str, setting: str, warmup: int, steps: int) -> dict:
    """One fresh process of `config` under `FMJAX_MALLOC=setting`."""
    code = CHILD.format(
        bench=os.path.join(REPO, "bench"), config=config, warmup=warmup, steps=steps
    )
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env = dict(env, **{ENV: setting})
    env = malloc_environ(env) or env
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=os.path.join(REPO, "docs/host_memory.json"))
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        runs = {setting: [] for setting in args.settings}
        for index in range(args.repeats):
            order = args.settings if index % 2 == 0 else args.settings[::-1]
            for setting in order:
                runs[setting].append(measure(config, setting, args.warmup, args.steps))
                print(config, setting, runs[setting][-1], flush=True)
        median = {
            setting: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for setting, rs in runs.items()
        }
        rows.append({"config": config, "runs": runs, "median": median})
        print(
            f"{config}: "
            + ", ".join(
                f"{setting} {m['ms_per_step']:.0f} ms a step, "
                f"{m['faults_per_step']:.0f} faults, {m['kernel_s_per_step']:.2f} s "
                f"kernel, {m['max_rss_mib']:.0f} MiB peak"
                for setting, m in median.items()
            ),
            flush=True,
        )
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
