"""The training loop: data, sharded init or resume, steps, eval, metrics, checkpoints.

`train(config, workdir)` is what `fmjax train` runs. Everything that can be
checked without compute (config values, dataset, vocabulary, mesh, sharding
rules) is checked first, so a bad run fails in a second with one message.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import sharding as shd
from fmjax import storage
from fmjax.adapt.methods import trainable_line, tree_bytes
from fmjax.checkpoint import Checkpointer
from fmjax.config import ConfigError, to_json
from fmjax.models import build_model
from fmjax.objectives import summarize
from fmjax.train.classify import ClassifyExperiment, overlay_pretrained
from fmjax.train.experiment import TextExperiment, validate
from fmjax.train.metrics import MetricsWriter
from fmjax.train.state import TrainState, make_optimizer
from fmjax.train.step import SUM_METRICS, jit_eval_step, jit_train_step


class NonFiniteLossError(FloatingPointError):
    pass


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )


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


def init_state(
    config,
    model,
    tx,
    mesh,
    seed: int | None = None,
    *,
    adaptation=None,
    pretrained=None,
):
    """eval_shape -> logical specs -> shardings -> jitted init, so full-size params
    are created directly in their shards and never whole on one device.

    `pretrained` (a param tree of numpy arrays) replaces the fresh params it has;
    `adaptation` (fmjax.adapt.methods.Adaptation) splits them into trained and
    frozen. Returns (abstract state, state shardings, init function); nothing is
    allocated until init() is called.
    """
    rng = jax.random.PRNGKey(config.train.seed if seed is None else seed)
    # Param shapes do not depend on the batch: trace with one short row per
    # batch-sharded device.
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tokens = jnp.zeros((rows, 8), jnp.int32)

    def init_params(rng):
        return model.init(
            {"params": jax.random.fold_in(rng, 1), "dropout": rng},
            tokens,
            segment_ids_BL=tokens + 1,
            positions_BL=tokens,
        )["params"]

    def create(rng, pretrained):
        params = nn.unbox(init_params(rng))
        if pretrained is not None:
            params = overlay_pretrained(params, pretrained)
        frozen = {}
        if adaptation is not None:
            params, frozen = adaptation.split(params, jax.random.fold_in(rng, 3))
        return TrainState.create(params, tx, jax.random.fold_in(rng, 2), frozen)

    boxed_params = jax.eval_shape(init_params, rng)
    abstract = jax.eval_shape(create, rng, pretrained)
    shardings = shd.shardings_like_params(
        abstract, boxed_params, mesh, config.mesh.rules
    )

    def init():
        with shd.activate(mesh, config.mesh.rules):
            return jax.jit(create, out_shardings=shardings)(rng, pretrained)

    return abstract, shardings, init


def make_experiment(config):
    """The data, tokenizer, model config and loss of a run, by objective."""
    if config.objective.name == "classify":
        return ClassifyExperiment.from_config(config)
    return TextExperiment.from_config(config)


def _device_sum(acc, metrics):
    return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


_add = jax.jit(_device_sum)


def _window_summary(window: dict, steps: int) -> dict:
    out = summarize({k: window[k] for k in SUM_METRICS})
    for key, value in window.items():
        if key not in SUM_METRICS and key != "nonfinite":
            out[key] = float(value) / max(steps, 1)
    return {k: float(v) for k, v in out.items()}


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def evaluate(
    exp, eval_fn, state, mesh, max_batches: int = 0, split: str | None = None
) -> dict:
    """Metric sums over an eval split (default: the run's; every example once),
    then summarized.

    Processes can run out of eval batches at different steps; one that has none
    left feeds an all-padding batch (weight 0) until every process is done.
    """
    total = None
    empty = exp.empty_batch(exp.batch_size // jax.process_count())
    rng = jax.random.PRNGKey(exp.seed + 1)
    batches = iter(exp.eval_iterator(split))
    for index in itertools.count():
        if max_batches and index >= max_batches:
            break
        local_batch = next(batches, None)
        if not _any_process(local_batch is not None):
            break
        if local_batch is None:
            local_batch = empty
        batch = shd.global_batch(local_batch, mesh)
        metrics = eval_fn(
            state.params, state.frozen, batch, jax.random.fold_in(rng, index)
        )
        total = _add(total, metrics)
    if total is None:
        raise ConfigError(f"eval split {split or exp.eval_split!r} produced no batches")
    return {k: float(v) for k, v in summarize(jax.device_get(total)).items()}


def _host_params(params):
    """Params as numpy on every process (sharded arrays span processes)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


@dataclasses.dataclass
class _Run:
    """What `train` and `evaluate_workdir` build before any step runs."""

    exp: Any
    mesh: Any
    model: Any
    lr_fn: Any
    abstract: TrainState
    shardings: TrainState
    init: Any

    @property
    def adaptation(self):
        return getattr(self.exp, "adaptation", None)


def _build(config) -> _Run:
    """Checks, data, tokenizer, model and the sharded init, in the order that makes
    a bad config fail fastest."""
    validate(config)
    mesh = shd.mesh_from_config(config.mesh)
    shd.normalize_rules(config.mesh.rules, mesh)
    exp = make_experiment(config)  # prepares data + tokenizer, resolves the model
    model = build_model(exp.model_config)
    tx, lr_fn = make_optimizer(config.train.steps, **config.optimizer)
    abstract, shardings, init = init_state(
        config,
        model,
        tx,
        mesh,
        adaptation=getattr(exp, "adaptation", None),
        pretrained=getattr(exp, "pretrained", None),
    )
    return _Run(exp, mesh, model, lr_fn, abstract, shardings, init)


def _restore(run: _Run, ckpt: Checkpointer, step: int):
    """(state, data, loop) at `step`. Checkpoints hold no frozen params (a base
    model under an adapter is rebuilt from init.model), so they stay adapter-sized."""
    state, data, loop_state, _ = ckpt.restore(step, run.abstract, run.shardings)
    frozen = run.init().frozen if jax.tree.leaves(run.abstract.frozen) else {}
    return state.replace(frozen=frozen), data, loop_state


# Config groups that shape the saved state: a resumed run must match them.
_STATE_GROUPS = ("objective", "model", "adapt")


def _check_resumable(workdir: str, config) -> None:
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return
    saved = json.loads(storage.read_text(path))
    current = json.loads(to_json(config))
    differ = []
    for group in _STATE_GROUPS:
        old, new = saved.get(group, {}), current.get(group, {})
        differ += [
            f"{group}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
    if differ:
        raise ConfigError(
            f"{workdir} holds checkpoints of another model or method "
            f"({'; '.join(differ)}); resume with its config (fmjax train "
            f"--workdir {workdir}) or use a new --workdir"
        )


def param_report(run: _Run) -> dict | None:
    """Trainable/all param counts and the bytes of params and optimizer state."""
    if run.adaptation is None:
        return None
    report = run.adaptation.summary(run.abstract.params, run.abstract.frozen)
    report["optimizer_bytes"] = tree_bytes(run.abstract.opt_state)
    return report


def _print_report(report: dict) -> None:
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    total = report["trained_bytes"] + report["frozen_bytes"] + report["optimizer_bytes"]
    print(trainable_line(report))
    print(
        f"memory ({report['method']}): trained params {mib(report['trained_bytes'])}"
        f" + frozen params {mib(report['frozen_bytes'])} + optimizer state "
        f"{mib(report['optimizer_bytes'])} = {mib(total)}"
    )
    if report.get("quantized_bytes"):
        ratio = report["quantized_bytes_f32"] / report["quantized_bytes"]
        print(
            f"NF4 weights: {mib(report['quantized_bytes'])}, 1/{ratio:.2f} of their "
            f"{mib(report['quantized_bytes_f32'])} in float32"
        )


def train(config, workdir: str) -> dict:
    """Trains (or resumes) in `workdir`; returns and writes summary.json."""
    started = time.time()
    storage.makedirs(workdir)
    run = _build(config)
    exp, mesh = run.exp, run.mesh
    steps = config.train.steps
    exp.tokenizer.save(workdir)
    report = param_report(run)
    if report is not None and jax.process_index() == 0:
        _print_report(report)
    loss_fn = exp.loss_fn(run.model)
    with shd.activate(mesh, config.mesh.rules):
        train_fn = jit_train_step(
            loss_fn, run.lr_fn, config.optimizer.grad_accum_steps, run.shardings, mesh
        )
        eval_fn = jit_eval_step(loss_fn, run.shardings, mesh)

    ckpt = Checkpointer(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    writer = MetricsWriter(workdir)
    train_iter = exp.train_iterator()
    window, window_steps = None, 0
    start = ckpt.latest_step()
    if start is not None:
        _check_resumable(workdir, config)
        state, data, loop_state = _restore(run, ckpt, start)
        train_iter.set_state(data)
        window_steps = loop_state["window_steps"]
        if loop_state["window"] is not None:
            window = {
                k: jnp.asarray(v, jnp.float32) for k, v in loop_state["window"].items()
            }
        writer.truncate_after(start)
        print(f"resumed from step {start} in {ckpt.directory}")
    else:
        start = 0
        state = run.init()
        storage.write_text(storage.join(workdir, "config.json"), to_json(config))
    config_dict = json.loads(to_json(config))

    def save(step):
        host_window = None if window is None else jax.device_get(window)
        if host_window is not None and host_window["nonfinite"] > 0:
            raise NonFiniteLossError(
                f"loss became NaN/Inf between steps {step - window_steps} and {step}; "
                f"stopped without saving: the last good checkpoint is step "
                f"{ckpt.latest_step()} in {ckpt.directory}"
            )
        loop_state = {
            "window": None
            if host_window is None
            else {k: float(v) for k, v in host_window.items()},
            "window_steps": window_steps,
        }
        ckpt.save(step, state, train_iter.get_state(), loop_state, config_dict)

    eval_every = config.train.eval_every
    eval_batches = config.train.eval_batches
    with shd.activate(mesh, config.mesh.rules):
        if start == 0 and eval_every:
            writer.write(0, "eval", evaluate(exp, eval_fn, state, mesh, eval_batches))
    progress = _progress(steps, start, config.train.progress)
    tokens_seen, tick = 0, time.time()
    preempted = False
    last_train = {}
    final_eval = test_eval = None
    try:
        with _Preemption() as preemption, shd.activate(mesh, config.mesh.rules):
            for step in range(start + 1, steps + 1):
                local_batch = next(train_iter)
                tokens_seen += int(np.count_nonzero(local_batch["segment_ids"]))
                state, metrics = train_fn(state, shd.global_batch(local_batch, mesh))
                window = _add(window, metrics)
                window_steps += 1
                progress.update(1)
                if step % config.train.log_every == 0 or step == steps:
                    host = jax.device_get(window)
                    if host["nonfinite"] > 0:
                        save(step)  # raises NonFiniteLossError, saves nothing
                    elapsed = time.time() - tick
                    last_train = _window_summary(host, window_steps)
                    last_train["tokens_per_s"] = (
                        tokens_seen * jax.process_count() / max(elapsed, 1e-9)
                    )
                    writer.write(step, "train", last_train)
                    progress.set_postfix(
                        loss=f"{last_train['loss']:.3f}",
                        tok_s=f"{last_train['tokens_per_s']:.0f}",
                    )
                    window, window_steps = None, 0
                    tokens_seen, tick = 0, time.time()
                if eval_every and step % eval_every == 0 and step != steps:
                    metrics_eval = evaluate(exp, eval_fn, state, mesh, eval_batches)
                    writer.write(step, "eval", metrics_eval)
                if step % config.checkpoint.every == 0 or step == steps:
                    save(step)
                if preemption.should_stop(step):
                    save(step)
                    preempted = True
                    print(
                        f"SIGTERM: saved a checkpoint at step {step}; rerun to resume"
                    )
                    break
            if not preempted:
                final_eval = evaluate(exp, eval_fn, state, mesh, eval_batches)
                writer.write(steps, "eval", final_eval)
                test_split = getattr(exp, "test_split", "")
                if test_split:
                    test_eval = evaluate(exp, eval_fn, state, mesh, 0, test_split)
                    writer.write(steps, "test", test_eval)
    finally:
        progress.close()
        ckpt.close()
        writer.close()

    summary = {
        "config": config.config_spec if "config_spec" in config else config.name,
        "steps": int(jax.device_get(state.step)),
        "preempted": preempted,
        "train": last_train,
        "eval": final_eval,
        "wall_time_s": time.time() - started,
    }
    if test_eval is not None:
        summary["test"] = test_eval
    if report is not None:
        summary["params"] = report
    if hasattr(exp, "num_train_examples"):
        summary["train_examples"] = exp.num_train_examples()
    if not preempted:
        _export(run, workdir, state, config)
        if jax.process_index() == 0:
            storage.write_text(
                storage.join(workdir, "summary.json"), json.dumps(summary, indent=2)
            )
    return summary


def _export(run: _Run, workdir: str, state: TrainState, config) -> None:
    """The whole model, or (adapter methods) only the trained params: the base
    stays where init.model points."""
    from fmjax.export import ADAPTER_WEIGHTS, MODEL_WEIGHTS, export

    adapter = run.adaptation is not None and run.adaptation.method != "full"
    export(
        workdir,
        _host_params(state.params),
        config,
        run.exp.tokenizer,
        weights=ADAPTER_WEIGHTS if adapter else MODEL_WEIGHTS,
    )


def evaluate_workdir(config, workdir: str) -> dict:
    """`fmjax eval`: the latest checkpoint's params on the eval split."""
    run = _build(config)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"no checkpoint in {ckpt.directory}; run `fmjax train` first")
    state = _restore(run, ckpt, step)[0]
    ckpt.close()
    with shd.activate(run.mesh, config.mesh.rules):
        eval_fn = jit_eval_step(run.exp.loss_fn(run.model), run.shardings, run.mesh)
        metrics = evaluate(run.exp, eval_fn, state, run.mesh, config.train.eval_batches)
    writer = MetricsWriter(workdir, tensorboard=False)
    writer.write(step, "eval", metrics)
    return {"step": step, **metrics}
