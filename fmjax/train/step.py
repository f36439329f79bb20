"""Pure train and eval steps. The loop jits them with shardings and donation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fmjax import objectives
from fmjax.sharding import batch_sharding
from fmjax.train.state import TrainState

# Metrics that are sums over tokens (they aggregate exactly over micro-batches,
# steps and eval batches); every other metric is one number per step.
SUM_METRICS = ("loss_sum", "correct", "count")

# loss_fn(params, frozen, batch, rng, train) -> metric sums.
LossFn = Callable[..., dict]
# combine(params, frozen, rng, train) -> (model params, extra model kwargs).
Combine = Callable[..., tuple[Any, dict]]


def full_params(params, frozen, rng, train):
    """Full training: the trained params are the model's params."""
    return params, {}


def text_loss_fn(
    model: nn.Module,
    objective: str,
    *,
    mask_id: int = 0,
    vocab_size: int = 0,
    special_ids: tuple[int, ...] = (),
    mask_rate: float = 0.15,
    combine: Combine = full_params,
) -> LossFn:
    """Metric sums for MLM or next-token. `combine` turns (trained, frozen) params
    into what the model reads, e.g. a frozen base plus LoRA adapters."""

    def loss_fn(params, frozen, batch, rng, train: bool) -> dict:
        tokens, segment_ids = batch["tokens"], batch["segment_ids"]
        mask_rng, dropout_rng, adapter_rng = jax.random.split(rng, 3)
        model_params, extra = combine(params, frozen, adapter_rng, train)
        extra = dict(extra)
        if objective == "mlm":
            inputs, targets, weights = objectives.mlm_mask(
                mask_rng,
                tokens,
                segment_ids,
                mask_id=mask_id,
                vocab_size=vocab_size,
                special_ids=special_ids,
                rate=mask_rate,
            )
            num = objectives.max_predictions(tokens.shape[1], mask_rate)
            if num < tokens.shape[1]:
                positions, targets, weights = objectives.gather_predictions(
                    targets, weights, num
                )
                extra["predict_positions_BK"] = positions
        else:
            inputs = tokens
        out = model.apply(
            {"params": model_params},
            inputs,
            segment_ids_BL=segment_ids,
            positions_BL=batch["positions"],
            deterministic=not train,
            rngs={"dropout": dropout_rng},
            **extra,
        )
        if objective == "mlm":
            _, metrics = objectives.mlm_loss(out["logits"], targets, weights)
        else:
            _, metrics = objectives.next_token_loss(out["logits"], tokens, segment_ids)
        return metrics

    return loss_fn


def classification_loss_fn(model: nn.Module, *, combine: Combine = full_params):
    """Metric sums of a classifier (`model` returns "class_logits") on batches of
    `fmjax.data.classification`."""

    def loss_fn(params, frozen, batch, rng, train: bool) -> dict:
        dropout_rng, adapter_rng = jax.random.split(rng)
        model_params, extra = combine(params, frozen, adapter_rng, train)
        out = model.apply(
            {"params": model_params},
            batch["tokens"],
            segment_ids_BL=batch["segment_ids"],
            positions_BL=batch["positions"],
            type_ids_BL=batch["type_ids"],
            deterministic=not train,
            rngs={"dropout": dropout_rng},
            **extra,
        )
        _, metrics = objectives.classification_loss(
            out["class_logits"], batch["labels"], batch["weights"]
        )
        return metrics

    return loss_fn


def _grads_and_metrics(loss_fn: LossFn, params, frozen, batch, rng):
    def objective(p):
        metrics = loss_fn(p, frozen, batch, rng, True)
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
) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch, optionally in micro-batches.

    Gradients of the summed loss are added over micro-batches and divided by the
    total token count once, so accumulation gives the same update as one big batch.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
        grads, metrics = _grads_and_metrics(
            loss_fn, state.params, state.frozen, batch, rng
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
            )
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = jax.eval_shape(
            functools.partial(_grads_and_metrics, loss_fn),
            state.params,
            state.frozen,
            jax.tree.map(lambda x: x[0], micro),
            rng,
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, metrics), _ = jax.lax.scan(
            body, zeros, (jnp.arange(grad_accum_steps), micro)
        )
    count = jnp.maximum(metrics["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
    new_state = state.apply_gradients(grads)
    metrics = {key: metrics[key] for key in SUM_METRICS}
    metrics.update(
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(new_state.params),
        learning_rate=jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        nonfinite=(~jnp.isfinite(metrics["loss_sum"])).astype(jnp.float32),
    )
    return new_state, metrics


def eval_step(params, frozen, batch: dict, rng, *, loss_fn: LossFn) -> dict:
    metrics = loss_fn(params, frozen, batch, rng, False)
    return {key: metrics[key] for key in SUM_METRICS}


def jit_train_step(loss_fn, learning_rate_fn, grad_accum_steps, state_shardings, mesh):
    step = functools.partial(
        train_step,
        loss_fn=loss_fn,
        learning_rate_fn=learning_rate_fn,
        grad_accum_steps=grad_accum_steps,
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
        functools.partial(eval_step, loss_fn=loss_fn),
        in_shardings=(
            state_shardings.params,
            state_shardings.frozen,
            batch_sharding(mesh, rank=1),  # any rank: rows split, the rest whole
            replicated,
        ),
        out_shardings=replicated,
    )
