"""Timing two or more sides of a benchmark fairly: `alternate_rounds` runs
them in turns on the same cores and `round_results` reports each side's
rounds; `in_child` (`ChildStepper`) runs a side in a process of its own.
Used by `fmjax bench train` (`fmjax.bench`, `fmjax.bench_vision`,
`fmjax.bench_clip`) and the scripts in bench/.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import traceback
import weakref


def alternate_rounds(
    steppers: dict, warmup: int, steps: int, rounds: int, settle: int = 1
) -> dict[str, list[float]]:
    """Seconds per step of each `steppers` side ({name: run()}): `warmup`
    steps each, the sides taking turns step by step, then `settle` untimed
    rounds and `rounds` timed rounds of `steps` steps, the sides taking turns
    within every round, so all see the same machine state; every other round
    runs them in reverse order, so going first favours none. The untimed
    rounds take what is slow only the first few times (caches, first touches
    of memory) out of the timed ones.

    Each side's turn starts with one untimed step: a side's first step after
    the other's turn is slow on a virtual machine that hands freed memory
    back to its host (`clip:small`: 1.2-3.2 s against 0.3-0.5 s, after HF's
    turn or after 3 s asleep alike; `bench/pause_step.py`), so the timed
    steps are the steady state a training run sees."""
    for _ in range(warmup):
        for run in steppers.values():
            run()
    times = {name: [] for name in steppers}
    for index in range(-settle, rounds):
        order = list(steppers.items())
        for name, run in order[::-1] if index % 2 else order:
            run()  # the turn's first step, untimed
            start = time.perf_counter()
            for _ in range(steps):
                run()
            if index >= 0:
                times[name].append((time.perf_counter() - start) / steps)
    return times


class ChildStepper:
    """`builder(*args)` -> (run, *info), built and stepped in a child process
    (spawned: nothing inherited but the arguments). Calling the stepper does
    one of the child's steps and waits for it; `info` is the rest of what the
    builder returned.

    HF's side of `--against hf` runs so: each side then has a process, and a
    heap, of its own, as when a user runs either library, while the sides
    still take turns on the same cores. The child inherits the environment,
    so both sides run with the same malloc (`fmjax.host_memory`: jemalloc
    or glibc's huge-page tunable)."""

    def __init__(self, builder, *args):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        process = context.Process(
            target=_serve_steps, args=(builder, args, child), daemon=True
        )
        process.start()
        child.close()
        self.info = self._reply()
        weakref.finalize(self, _stop_child, self._conn, process)

    def _reply(self):
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"the benchmark's child process failed:\n{value}")
        return value

    def __call__(self):
        self._conn.send("step")
        return self._reply()


def _serve_steps(builder, args, conn):
    try:
        run, *info = builder(*args)
        conn.send(("ready", info))
        while conn.recv() == "step":
            run()
            conn.send(("done", None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))


def _stop_child(conn, process):
    try:
        conn.send("stop")
    except OSError:
        pass
    process.join(timeout=10)
    if process.is_alive():
        process.kill()


def in_child(builder, *args):
    """(run, *info) as `builder(*args)` returns them, with `run` stepping the
    builder's stepper in a `ChildStepper` process."""
    stepper = ChildStepper(builder, *args)
    return (stepper, *stepper.info)


def round_results(
    rounds_s: list[float], rows: int, unit: str, flops: float, peak: float
) -> dict:
    """One side's report of `alternate_rounds`: its median round, every
    round, `{unit}_per_s` (`rows` per step) and MFU of `flops` per step
    against `peak`."""
    step_s = statistics.median(rounds_s)
    return {
        "step_s": step_s,
        "step_s_rounds": rounds_s,
        f"{unit}_per_s": rows / step_s,
        "mfu": flops / step_s / peak,
    }
