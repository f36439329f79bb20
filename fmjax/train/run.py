"""What a run builds before its first step: the task, the mesh, the model, the
optimizer and the sharded init; plus restore and evaluation, which `fmjax
train` and `fmjax eval` share. Everything here reads the task protocol only
(`fmjax.tasks.base`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
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
from fmjax.models.registry import build_model, example_inputs
from fmjax.tasks import Task, task_for
from fmjax.tasks.pretrained import overlay_pretrained
from fmjax.train.state import TrainState, make_optimizer


def init_state(task: Task, model, tx, mesh, seed: int | None = None, adaptation=None):
    """eval_shape -> logical specs -> shardings -> jitted init, so full-size params
    are created directly in their shards and never whole on one device.

    The task's pretrained params (init.model) replace the fresh ones they have;
    its adaptation (or `adaptation`) splits them into trained and frozen. Returns
    (abstract state, state shardings, init function); nothing is allocated until
    init() is called.
    """
    config = task.config
    adaptation = adaptation or task.adaptation
    rng = jax.random.PRNGKey(config.train.seed if seed is None else seed)
    # Param shapes do not depend on the batch: trace one row per batch device.
    args, kwargs = example_inputs(
        task.model_config, mesh.shape["data"] * mesh.shape["fsdp"]
    )
    pretrained = task.pretrained
    new_params = task.new_param_prefixes

    def init_params(rng):
        rngs = {"params": jax.random.fold_in(rng, 1), "dropout": rng}
        return model.init(rngs, *args, **kwargs)["params"]

    def create(rng, pretrained):
        params = nn.unbox(init_params(rng))
        if pretrained is not None:
            params = overlay_pretrained(params, pretrained, new_params)
        params, frozen = adaptation.split(params, jax.random.fold_in(rng, 3))
        return TrainState.create(
            params, tx, jax.random.fold_in(rng, 2), frozen, task.init_extra(params)
        )

    boxed_params = jax.eval_shape(init_params, rng)
    abstract = jax.eval_shape(create, rng, pretrained)
    shardings = shd.shardings_like_params(
        abstract, boxed_params, mesh, config.mesh.rules
    )

    def init():
        with shd.activate(mesh, config.mesh.rules):
            return jax.jit(create, out_shardings=shardings)(rng, pretrained)

    return abstract, shardings, init


@dataclasses.dataclass
class Run:
    """What `train` and `evaluate_workdir` build before any step runs."""

    task: Task
    mesh: Any
    model: Any
    lr_fn: Any
    abstract: TrainState
    shardings: TrainState
    init: Any

    @property
    def config(self):
        return self.task.config

    def param_report(self) -> dict:
        """Trainable/all param counts and the bytes of params and optimizer state."""
        report = self.task.adaptation.summary(
            self.abstract.params, self.abstract.frozen
        )
        report["optimizer_bytes"] = tree_bytes(self.abstract.opt_state)
        return report


def build(config, *, with_data: bool = True) -> Run:
    """Checks, data, tokenizer, model and the sharded init, in the order that makes
    a bad config fail fastest."""
    mesh = shd.mesh_from_config(config.mesh)
    shd.normalize_rules(config.mesh.rules, mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.data.batch_size // config.optimizer.grad_accum_steps
    if micro % rows:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} (per accumulation step: "
            f"{micro}) does not split over the mesh's {rows} batch devices "
            f"(mesh.data x mesh.fsdp = {dict(mesh.shape)})"
        )
    task = task_for(config, with_data=with_data)
    model = build_model(task.model_config)
    tx, lr_fn = make_optimizer(config.train.steps, **config.optimizer)
    abstract, shardings, init = init_state(task, model, tx, mesh)
    return Run(task, mesh, model, lr_fn, abstract, shardings, init)


def restore(run: Run, ckpt: Checkpointer, step: int):
    """(state, data, loop) at `step`. Checkpoints hold no frozen params (a base
    model under an adapter is rebuilt from init.model), so they stay adapter-sized."""
    state, data, loop_state, _ = ckpt.restore(step, run.abstract, run.shardings)
    frozen = run.init().frozen if jax.tree.leaves(run.abstract.frozen) else {}
    return state.replace(frozen=frozen), data, loop_state


# Config groups that shape the saved state: a resumed run must match them.
_STATE_GROUPS = ("objective", "model", "adapt")
# Keys of those groups that say how a step is laid out, not what it computes
# or stores: a run may resume with other values (on a machine with less memory).
_LAYOUT_KEYS = {
    "model.max_logits_elements",
    "model.max_attention_elements",
    "model.remat",
}


def check_resumable(workdir: str, config) -> None:
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return
    saved = json.loads(storage.read_text(path))
    current = json.loads(to_json(config))
    differ = []
    for group in _STATE_GROUPS:
        old, new = saved.get(group, {}), current.get(group, {})
        # A key only one side has comes from another fmjax version (a run
        # written before a setting existed ran as its default does): compare
        # the keys both know, so an upgrade does not strand a run.
        differ += [
            f"{group}.{k}: {old[k]!r} -> {new[k]!r}"
            for k in sorted(set(old) & set(new))
            if old[k] != new[k] and f"{group}.{k}" not in _LAYOUT_KEYS
        ]
    if differ:
        raise ConfigError(
            f"{workdir} holds checkpoints of another model or method "
            f"({'; '.join(differ)}); resume with its config (fmjax train "
            f"--workdir {workdir}) or use a new --workdir"
        )


def any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


_add = jax.jit(lambda acc, sums: jax.tree.map(jnp.add, acc, sums))


def add_sums(acc, sums):
    """Running sums on device (no host transfer in the step loop)."""
    return sums if acc is None else _add(acc, sums)


def evaluate(
    task: Task, eval_fn, state, mesh, max_batches: int = 0, split: str | None = None
) -> dict:
    """The task's metrics over an eval split (default: the run's; every example
    once). Processes can run out of eval batches at different steps; one that has
    none left feeds an empty batch until every process is done."""
    total = None
    empty = task.empty_batch(task.batch_size // jax.process_count())
    rng = jax.random.PRNGKey(task.seed + 1)
    batches = iter(task.eval_iterator(split))
    for index in itertools.count():
        if max_batches and index >= max_batches:
            break
        local_batch = next(batches, None)
        if not any_process(local_batch is not None):
            break
        if local_batch is None:
            local_batch = empty
        batch = shd.global_batch(local_batch, mesh)
        sums = eval_fn(
            state.params,
            state.frozen,
            state.extra,
            batch,
            jax.random.fold_in(rng, index),
        )
        total = add_sums(total, sums)
    if total is None:
        raise ConfigError(
            f"eval split {split or task.eval_split!r} produced no batches"
        )
    return task.summarize(jax.device_get(total))


def host_params(params):
    """Params as numpy on every process (sharded arrays span processes)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def print_report(report: dict) -> None:
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
