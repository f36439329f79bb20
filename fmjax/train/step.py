"""Pure train and eval steps. The loop jits them with shardings and donation."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from fmjax.models import dense
from fmjax.sharding import batch_sharding
from fmjax.train.state import TrainState

# loss_fn(params, frozen, batch, rng, train, extra) -> metric sums (a task's
# `loss_fn`; `extra` is the task's state beside the params, `TrainState.extra`).
# Every value is a sum over the batch, so it adds up exactly over micro-batches,
# devices, steps and eval batches; "loss_sum" is differentiated and "count" is
# what it is divided by (tokens, examples, pairs).
LossFn = Callable[..., dict]
# update_extra(extra, new_params, sums, step) -> (extra, sums): a task's update of
# its extra state after the optimizer step (it may consume sums it alone reads).
UpdateExtra = Callable[..., tuple]
# constrain_params(params) -> params: a task's projection of the updated params
# onto their allowed set (CLIP's temperature clamp), applied after each update.
ConstrainParams = Callable[..., dict]
REQUIRED_SUMS = ("loss_sum", "count")
# Per-step metrics the train step adds beside the sums (averaged over steps).
STEP_METRICS = ("grad_norm", "param_norm", "learning_rate", "nonfinite")


def _sums(loss_fn: LossFn, params, frozen, batch, rng, train: bool, extra) -> dict:
    sums = loss_fn(params, frozen, batch, rng, train, extra)
    missing = [k for k in REQUIRED_SUMS if k not in sums]
    if missing:
        raise KeyError(f"loss_fn returned {sorted(sums)}; it must return {missing}")
    return sums


def _grads_and_metrics(loss_fn: LossFn, params, frozen, batch, rng, extra):
    def objective(p):
        metrics = _sums(loss_fn, p, frozen, batch, rng, True, extra)
        return metrics["loss_sum"], metrics

    grads, metrics = jax.grad(objective, has_aux=True)(params)
    return grads, metrics


def train_step(
    state: TrainState,
    batch: dict,
    *,
    loss_fn: LossFn,
    learning_rate_fn: optax.Schedule,
    grad_accum_steps: int = 1,
    update_extra: UpdateExtra | None = None,
    constrain_params: ConstrainParams | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch, optionally in micro-batches.

    Gradients of the summed loss are added over micro-batches and divided by the
    total token count once, so accumulation gives the same update as one big batch.
    `constrain_params` (a task's) then projects the new params (a clamp), and
    `update_extra` updates `state.extra` from them and the step's sums.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
        grads, metrics = _grads_and_metrics(
            loss_fn, state.params, state.frozen, batch, rng, state.extra
        )
    else:
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch
        )

        def body(carry, inputs):
            index, micro_batch = inputs
            grads, metrics = _grads_and_metrics(
                loss_fn,
                state.params,
                state.frozen,
                micro_batch,
                jax.random.fold_in(rng, index),
                state.extra,
            )
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = jax.eval_shape(
            functools.partial(_grads_and_metrics, loss_fn),
            state.params,
            state.frozen,
            jax.tree.map(lambda x: x[0], micro),
            rng,
            state.extra,
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, metrics), _ = jax.lax.scan(
            body, zeros, (jnp.arange(grad_accum_steps), micro)
        )
    # The scope names the update's ops in profiles (bench/profile_step.py).
    with jax.named_scope("optimizer"):
        count = jnp.maximum(metrics["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        new_state = state.apply_gradients(grads)
        if constrain_params is not None:
            new_state = new_state.replace(params=constrain_params(new_state.params))
    metrics = dict(metrics)
    if update_extra is not None:
        extra, metrics = update_extra(
            new_state.extra, new_state.params, metrics, state.step
        )
        new_state = new_state.replace(extra=extra)
    with jax.named_scope("optimizer"):
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(new_state.params),
            learning_rate=jnp.asarray(learning_rate_fn(state.step), jnp.float32),
            nonfinite=(~jnp.isfinite(metrics["loss_sum"])).astype(jnp.float32),
        )
    return new_state, metrics


def eval_step(params, frozen, extra, batch: dict, rng, *, loss_fn: LossFn) -> dict:
    return _sums(loss_fn, params, frozen, batch, rng, False, extra)


def _traced_for(platform: str, step, *args, **kwargs):
    """`step`, its products traced for the mesh's platform (a TPU plan is
    traced on this host: `dense.products_for`)."""
    with dense.products_for(platform):
        return step(*args, **kwargs)


def jit_train_step(
    loss_fn,
    learning_rate_fn,
    grad_accum_steps,
    state_shardings,
    mesh,
    update_extra: UpdateExtra | None = None,
    constrain_params: ConstrainParams | None = None,
):
    step = functools.partial(
        _traced_for,
        mesh.devices.flat[0].platform,
        train_step,
        loss_fn=loss_fn,
        learning_rate_fn=learning_rate_fn,
        grad_accum_steps=grad_accum_steps,
        update_extra=update_extra,
        constrain_params=constrain_params,
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh, rank=1)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(loss_fn, state_shardings, mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        functools.partial(
            _traced_for, mesh.devices.flat[0].platform, eval_step, loss_fn=loss_fn
        ),
        in_shardings=(
            state_shardings.params,
            state_shardings.frozen,
            state_shardings.extra,
            batch_sharding(mesh, rank=1),  # any rank: rows split, the rest whole
            replicated,
        ),
        out_shardings=replicated,
    )
