"""A config's train step on one XLA CPU device against the same step split
over `--devices` (2: what `fmjax train` makes of a CPU host), data-parallel,
in one process (the numbers behind `fmjax.host_devices` and
docs/performance.md's "Two devices on one CPU").

Starts JAX with that many host devices
(`--xla_force_host_platform_device_count`), builds each config's full
optimizer step twice on the same random batch (`fmjax.bench.fmjax_train_step`,
as `fmjax bench train` does), with `mesh.num_devices=1` and `=N`, reports
their first steps' losses, then times them in alternating rounds
(`fmjax.bench_rounds.alternate_rounds`) so both see the same machine state.
Prints each side's median step and the ratio (one device's step over N
devices'). Runs with the malloc the `fmjax` command starts itself with
(`fmjax.host_memory`).

    python bench/host_devices_ab.py
    python bench/host_devices_ab.py --configs configs/clip.py:small --devices 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

CONFIGS = (
    "configs/gpt_lm.py:small",
    "configs/bert_mlm.py:small",
    "configs/clip.py:small",
    "configs/vit_supervised.py:small",
    "configs/vit_mae.py:small",
)


def compare(spec: str, devices: int, steps: int, rounds: int) -> dict:
    import jax

    from fmjax.bench import fmjax_train_step, random_train_batch
    from fmjax.bench_rounds import alternate_rounds
    from fmjax.config import load_config

    steppers, losses = {}, {}
    for count in (1, devices):
        config = load_config(spec, [f"--config.mesh.num_devices={count}"])
        run, _, _ = fmjax_train_step(config, random_train_batch(config))
        metrics = run()
        key = "loss_sum" if "loss_sum" in metrics else "loss"
        losses[count] = float(jax.device_get(metrics[key]))
        steppers[count] = run
    times = alternate_rounds(steppers, warmup=1, steps=steps, rounds=rounds)
    median = {d: statistics.median(t) for d, t in times.items()}
    return {
        "config": spec,
        "devices": devices,
        "first_loss": losses,
        "step_ms": {d: 1e3 * m for d, m in median.items()},
        "rounds_ms": {d: [round(1e3 * x, 1) for x in t] for d, t in times.items()},
        "speedup": median[1] / median[devices],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="per side and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    if args.devices < 2:
        parser.error(f"--devices {args.devices}: expected 2 or more")
    from fmjax.host_devices import FLAG

    flags = os.environ.get("XLA_FLAGS", "")
    wanted = f"{FLAG}={args.devices}"
    if FLAG in flags and wanted not in flags.split():
        parser.error(f"XLA_FLAGS sets another {FLAG}; this script sets {wanted}")
    if wanted not in flags.split():  # (the process started again keeps it)
        os.environ["XLA_FLAGS"] = f"{flags} {wanted}".strip()
    from fmjax.host_memory import reexec_with_malloc

    reexec_with_malloc(sys.argv)
    results = []
    n = args.devices
    for spec in args.configs:
        r = compare(spec, n, args.steps, args.rounds)
        results.append(r)
        print(
            f"{spec}: 1 device {r['step_ms'][1]:.1f} ms, {n} devices "
            f"{r['step_ms'][n]:.1f} ms a step: {r['speedup']:.3f}x; first "
            f"loss {r['first_loss'][1]!r} and {r['first_loss'][n]!r}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
