"""The training loop: data, sharded init or resume, steps, eval, metrics, checkpoints.

`train(config, workdir)` is what `fmjax train` runs. Everything that can be
checked without compute (config values, dataset, vocabulary, mesh, sharding
rules) is checked first, so a bad run fails in a second with one message.
"""

from __future__ import annotations

import itertools
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import sharding as shd
from fmjax import storage
from fmjax.checkpoint import Checkpointer
from fmjax.config import ConfigError, to_json
from fmjax.data.text import BATCH_KEYS
from fmjax.models import build_model
from fmjax.objectives import summarize
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


def init_state(config, model, tx, mesh, seed: int | None = None):
    """eval_shape -> logical specs -> shardings -> jitted init, so full-size params
    are created directly in their shards and never whole on one device.

    Returns (abstract state, state shardings, init function); nothing is allocated
    until init() is called.
    """
    rng = jax.random.PRNGKey(config.train.seed if seed is None else seed)
    # Param shapes do not depend on the batch: trace with one short row per
    # batch-sharded device.
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tokens = jnp.zeros((rows, 8), jnp.int32)

    def create(rng):
        params = model.init(
            {"params": jax.random.fold_in(rng, 1), "dropout": rng},
            tokens,
            segment_ids_BL=tokens + 1,
            positions_BL=tokens,
        )["params"]
        return TrainState.create(params, tx, jax.random.fold_in(rng, 2))

    abstract_boxed = jax.eval_shape(create, rng)
    shardings = shd.shardings_for(abstract_boxed, mesh, config.mesh.rules)
    from flax.core import meta

    unboxed_create = lambda rng: meta.unbox(create(rng))
    abstract = jax.eval_shape(unboxed_create, rng)

    def init():
        with shd.activate(mesh, config.mesh.rules):
            return jax.jit(unboxed_create, out_shardings=shardings)(rng)

    return abstract, shardings, init


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


def evaluate(exp: TextExperiment, eval_fn, state, mesh, max_batches: int = 0):
    """Metric sums over the eval split (every example once), then summarized.

    Processes can run out of eval batches at different steps; one that has none
    left feeds an all-padding batch (weight 0) until every process is done.
    """
    total = None
    rows = exp.batch_size // jax.process_count()
    empty = {k: np.zeros((rows, exp.seq_len), np.int32) for k in BATCH_KEYS}
    rng = jax.random.PRNGKey(exp.seed + 1)
    batches = iter(exp.eval_iterator())
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
        raise ConfigError(f"eval split {exp.eval_split!r} produced no batches")
    return {k: float(v) for k, v in summarize(jax.device_get(total)).items()}


def _host_params(params):
    """Params as numpy on every process (sharded arrays span processes)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def train(config, workdir: str) -> dict:
    """Trains (or resumes) in `workdir`; returns and writes summary.json."""
    started = time.time()
    storage.makedirs(workdir)
    validate(config)
    mesh = shd.mesh_from_config(config.mesh)
    shd.normalize_rules(config.mesh.rules, mesh)
    model = build_model(config.model)
    steps = config.train.steps
    tx, lr_fn = make_optimizer(steps, **config.optimizer)
    # Shardings before data: a rule that cannot shard a param fails in a second.
    abstract, shardings, init = init_state(config, model, tx, mesh)
    exp = TextExperiment.from_config(config)  # validates, prepares data + tokenizer
    exp.tokenizer.save(workdir)
    loss_fn = exp.loss_fn(model)
    with shd.activate(mesh, config.mesh.rules):
        train_fn = jit_train_step(
            loss_fn, lr_fn, config.optimizer.grad_accum_steps, shardings, mesh
        )
        eval_fn = jit_eval_step(loss_fn, shardings, mesh)

    ckpt = Checkpointer(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    writer = MetricsWriter(workdir)
    train_iter = exp.train_iterator()
    window, window_steps = None, 0
    start = ckpt.latest_step()
    if start is not None:
        state, data, loop_state, _ = ckpt.restore(start, abstract, shardings)
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
        state = init()
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
            final_eval = None
            if not preempted:
                final_eval = evaluate(exp, eval_fn, state, mesh, eval_batches)
                writer.write(steps, "eval", final_eval)
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
    if not preempted:
        from fmjax.export import export

        export(workdir, _host_params(state.params), config, exp.tokenizer)
        if jax.process_index() == 0:
            storage.write_text(
                storage.join(workdir, "summary.json"), json.dumps(summary, indent=2)
            )
    return summary


def evaluate_workdir(config, workdir: str) -> dict:
    """`fmjax eval`: the latest checkpoint's params on the eval split."""
    exp = TextExperiment.from_config(config)
    mesh = shd.mesh_from_config(config.mesh)
    model = build_model(config.model)
    tx, _ = make_optimizer(config.train.steps, **config.optimizer)
    abstract, shardings, _ = init_state(config, model, tx, mesh)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"no checkpoint in {ckpt.directory}; run `fmjax train` first")
    state = ckpt.restore(step, abstract, shardings)[0]
    ckpt.close()
    with shd.activate(mesh, config.mesh.rules):
        eval_fn = jit_eval_step(exp.loss_fn(model), shardings, mesh)
        metrics = evaluate(exp, eval_fn, state, mesh, config.train.eval_batches)
    writer = MetricsWriter(workdir, tensorboard=False)
    writer.write(step, "eval", metrics)
    return {"step": step, **metrics}
