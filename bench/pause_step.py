"""The first train step after a pause -> docs/performance.md.

Times `clip:small`'s full fmjax step one step at a time (milliseconds and
minor page faults of each): 8 steps, 6 steps of HF's CLIPModel in its own
process (as `fmjax bench train --against hf` runs it), 10 fmjax steps, 3 s of
sleep, 10 fmjax steps. On a virtual machine that hands freed memory back to
its host, the first fmjax step after HF's turn and after the sleep is slow.

    python bench/pause_step.py
"""

from __future__ import annotations

import resource
import sys
import time


def timed(label: str, run, steps: int) -> None:
    out = []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        ms = (time.perf_counter() - start) * 1e3
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt
        out.append(f"{ms:.0f} ms/{faults} faults")
    print(f"{label}: " + ", ".join(out), flush=True)


def main() -> int:
    from fmjax import bench, bench_clip
    from fmjax.bench_rounds import in_child
    from fmjax.config import load_config
    from fmjax.host_memory import reexec_with_malloc
    from fmjax.tasks import task_for

    reexec_with_malloc(sys.argv)  # as the `fmjax` command
    config = load_config("configs/clip.py:small", ["--config.mesh.num_devices=1"])
    batch = bench_clip.random_pairs(task_for(config, with_data=False), 128)
    fmjax_step = bench.fmjax_train_step(config, batch)[0]
    hf_step = in_child(bench_clip._hf_step, config, batch, 2)[0]
    timed("fmjax", fmjax_step, 8)
    timed("HF", hf_step, 6)
    timed("fmjax after HF", fmjax_step, 10)
    time.sleep(3)
    timed("fmjax after 3 s asleep", fmjax_step, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
