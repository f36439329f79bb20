"""The training loop: `train(config, workdir)` is what `fmjax train` runs.

    run = build(config)                      # task, mesh, model, sharded init
    state, ... = restore or init             # resume exactly where a run stopped
    for step: train, log, maybe eval, maybe checkpoint, stop on SIGTERM
    finish: final eval, the task's evaluators, export, summary.json

Everything that can be checked without compute (config values, dataset,
vocabulary, mesh, sharding rules) is checked by `build`, so a bad run fails in
a second with one message. The loop knows only the task protocol.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time

import jax
import jax.numpy as jnp

from fmjax import sharding as shd
from fmjax import storage
from fmjax.checkpoint import Checkpointer
from fmjax.config import ConfigError, to_json
from fmjax.errors import FmjaxError
from fmjax.tasks import EvalContext
from fmjax.train.metrics import MetricsWriter
from fmjax.train.run import (
    Run,
    add_sums,
    build,
    check_resumable,
    evaluate,
    host_params,
    print_report,
    restore,
)
from fmjax.train.step import STEP_METRICS, jit_eval_step, jit_train_step


class NonFiniteLossError(FmjaxError, FloatingPointError):
    pass


class _Preemption:
    """SIGTERM asks for a checkpoint at a step boundary. With one process a signal
    handler sets a flag; with several, JAX's preemption sync service picks the same
    step on every process (each may receive the signal at a different step)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            return self

        def handler(signum, frame):
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker)
            self._previous = None
        return self

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Window:
    """Metrics summed on device since the last log step."""

    sums: dict | None = None
    steps: int = 0
    units: int = 0  # the task's throughput units (e.g. tokens) on this process
    tick: float = dataclasses.field(default_factory=time.time)

    def add(self, metrics, units: int) -> None:
        self.sums = add_sums(self.sums, metrics)
        self.steps += 1
        self.units += units

    def to_json(self) -> dict:
        host = None if self.sums is None else jax.device_get(self.sums)
        window = None if host is None else {k: float(v) for k, v in host.items()}
        return {"window": window, "window_steps": self.steps}

    @classmethod
    def from_json(cls, loop_state: dict) -> _Window:
        window = loop_state["window"]
        sums = None
        if window is not None:
            sums = {k: jnp.asarray(v, jnp.float32) for k, v in window.items()}
        return cls(sums=sums, steps=loop_state["window_steps"])

    def nonfinite(self) -> bool:
        return self.sums is not None and float(self.sums["nonfinite"]) > 0


class _Loop:
    """The state of one `train` call between its named steps."""

    def __init__(self, run: Run, workdir: str):
        self.run, self.workdir = run, workdir
        self.task, self.mesh, self.config = run.task, run.mesh, run.config
        loss_fn = self.task.loss_fn(run.model)
        with self.activated():
            self.train_fn = jit_train_step(
                loss_fn,
                run.lr_fn,
                self.config.optimizer.grad_accum_steps,
                run.shardings,
                self.mesh,
                self.task.update_extra,
                self.task.constrain_params,
            )
            self.eval_fn = jit_eval_step(loss_fn, run.shardings, self.mesh)
        checkpoint = self.config.checkpoint
        self.ckpt = Checkpointer(
            workdir, keep=checkpoint.keep, async_save=checkpoint.async_save
        )
        self.writer = MetricsWriter(workdir)
        self.data = self.task.train_iterator()
        self.window = _Window()
        self.state = None
        self.start = 0
        self.last_train: dict = {}

    def activated(self):
        return shd.activate(self.mesh, self.config.mesh.rules)

    def evaluate(self, split: str | None = None, max_batches: int | None = None):
        if max_batches is None:
            max_batches = 0 if split else self.config.train.eval_batches
        with self.activated():
            return evaluate(
                self.task, self.eval_fn, self.state, self.mesh, max_batches, split
            )

    # --- restore or init ----------------------------------------------------------

    def restore_or_init(self) -> None:
        start = self.ckpt.latest_step()
        if start is None:
            self.state = self.run.init()
            storage.write_text(
                storage.join(self.workdir, "config.json"), to_json(self.config)
            )
            if self.config.train.eval_every:
                self.writer.write(0, "eval", self.evaluate())
            return
        check_resumable(self.workdir, self.config)
        self.state, data, loop_state = restore(self.run, self.ckpt, start)
        self.data.set_state(data)
        self.window = _Window.from_json(loop_state)
        self.writer.truncate_after(start)
        self.start = start
        print(f"resumed from step {start} in {self.ckpt.directory}")

    # --- the step loop --------------------------------------------------------------

    def save(self, step: int) -> None:
        if self.window.nonfinite():
            raise NonFiniteLossError(
                f"loss became NaN/Inf between steps {step - self.window.steps} and "
                f"{step}; stopped without saving: the last good checkpoint is step "
                f"{self.ckpt.latest_step()} in {self.ckpt.directory}"
            )
        self.ckpt.save(
            step,
            self.state,
            self.data.get_state(),
            self.window.to_json(),
            json.loads(to_json(self.config)),
        )

    def log(self, step: int, progress) -> None:
        if self.window.nonfinite():
            self.save(step)  # raises NonFiniteLossError, saves nothing
        sums = jax.device_get(self.window.sums)
        steps = max(self.window.steps, 1)
        metrics = self.task.summarize(
            {k: v for k, v in sums.items() if k not in STEP_METRICS}
        )
        for key in STEP_METRICS:
            if key != "nonfinite":
                metrics[key] = float(sums[key]) / steps
        unit = self.task.throughput_unit
        elapsed = max(time.time() - self.window.tick, 1e-9)
        metrics[f"{unit}_per_s"] = self.window.units * jax.process_count() / elapsed
        self.writer.write(step, "train", metrics)
        progress.set_postfix(
            loss=f"{metrics['loss']:.3f}", **{unit: f"{metrics[f'{unit}_per_s']:.0f}/s"}
        )
        self.last_train = metrics
        self.window = _Window()

    def steps(self) -> bool:
        """Runs the steps after `self.start`; False if SIGTERM stopped them."""
        config = self.config
        total, every = config.train.steps, config.checkpoint.every
        eval_every = config.train.eval_every
        evaluators_every = config.train.get("evaluators_every", 0)
        progress = _progress(total, self.start, config.train.progress)
        try:
            with _Preemption() as preemption, self.activated():
                for step in range(self.start + 1, total + 1):
                    local_batch = next(self.data)
                    units = self.task.throughput(local_batch)
                    batch = shd.global_batch(local_batch, self.mesh)
                    self.state, metrics = self.train_fn(self.state, batch)
                    self.window.add(metrics, units)
                    progress.update(1)
                    if step % config.train.log_every == 0 or step == total:
                        self.log(step, progress)
                    if step != total and _due(step, eval_every):
                        self.writer.write(step, "eval", self.evaluate())
                    if step != total and _due(step, evaluators_every):
                        self.run_evaluators(step)
                    if step % every == 0 or step == total:
                        self.save(step)
                    if preemption.should_stop(step):
                        self.save(step)
                        print(f"SIGTERM: saved a checkpoint at step {step}; rerun")
                        return False
        finally:
            progress.close()
        return True

    # --- finish -----------------------------------------------------------------------

    def eval_context(self) -> EvalContext:
        return EvalContext(
            task=self.task,
            model=self.run.model,
            params=self.state.params,
            frozen=self.state.frozen,
            evaluate=lambda split: self.evaluate(split, max_batches=0),
        )

    def run_evaluators(self, step: int, context=None) -> dict:
        """The task's evaluators on the current params, each written to the
        metrics under its name at `step`."""
        context = context or self.eval_context()
        results = {}
        for evaluator in self.task.evaluators:
            results[evaluator.name] = evaluator(context)
            self.writer.write(step, evaluator.name, results[evaluator.name])
        return results

    def finish(self) -> dict:
        """The final eval and the task's evaluators (each reported under its
        name), then the export."""
        total = self.config.train.steps
        results = {"eval": self.evaluate()}
        self.writer.write(total, "eval", results["eval"])
        context = self.eval_context()
        results.update(self.run_evaluators(total, context))
        self.task.export(
            self.workdir, host_params(self.state.params), host_params(self.state.frozen)
        )
        sample = self.task.sample(context)
        if sample:
            results["sample"] = sample
            if jax.process_index() == 0:
                print(f"sample: {sample['prompt']!r} -> {sample['continuation']!r}")
        return results

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def _due(step: int, every: int) -> bool:
    """Whether a periodic action (every 0 steps: never) runs at `step`."""
    return bool(every) and step % every == 0


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )


def train(config, workdir: str) -> dict:
    """Trains (or resumes) in `workdir`; returns and writes summary.json."""
    started = time.time()
    storage.makedirs(workdir)
    run = build(config)
    run.task.save_assets(workdir)
    report = run.param_report()
    mesh = {axis: int(size) for axis, size in run.mesh.shape.items()}
    if jax.process_index() == 0:
        print_report(report)
        kind = run.mesh.devices.flat[0].platform
        print(f"mesh: {mesh} over {run.mesh.devices.size} {kind} devices")
    loop = _Loop(run, workdir)
    try:
        loop.restore_or_init()
        finished = loop.steps()
        results = loop.finish() if finished else {"eval": None}
    finally:
        loop.close()
    summary = {
        "config": config.get("config_spec", config.name),
        "steps": int(jax.device_get(loop.state.step)),
        "preempted": not finished,
        "train": loop.last_train,
        **results,
        "wall_time_s": time.time() - started,
        "params": report,
        "mesh": mesh,
        **run.task.summary(),
    }
    if finished and jax.process_index() == 0:
        storage.write_text(
            storage.join(workdir, "summary.json"), json.dumps(summary, indent=2)
        )
    return summary


def evaluate_workdir(config, workdir: str) -> dict:
    """`fmjax eval`: the latest checkpoint's params on the eval split."""
    run = build(config)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"no checkpoint in {ckpt.directory}; run `fmjax train` first")
    state = restore(run, ckpt, step)[0]
    ckpt.close()
    with shd.activate(run.mesh, config.mesh.rules):
        eval_fn = jit_eval_step(run.task.loss_fn(run.model), run.shardings, run.mesh)
        metrics = evaluate(
            run.task, eval_fn, state, run.mesh, config.train.eval_batches
        )
        context = EvalContext(
            task=run.task,
            model=run.model,
            params=state.params,
            frozen=state.frozen,
            evaluate=lambda split: evaluate(
                run.task, eval_fn, state, run.mesh, 0, split
            ),
        )
        results = {e.name: e(context) for e in run.task.evaluators}
    writer = MetricsWriter(workdir, tensorboard=False)
    writer.write(step, "eval", metrics)
    for name, values in results.items():
        writer.write(step, name, values)
    return {"step": step, **metrics, **results}
