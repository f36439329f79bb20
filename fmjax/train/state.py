"""TrainState and the optimizer built from config."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step reads or changes. `params` are trained; `frozen` params
    (a base model under LoRA, prefix or prompt tuning; empty for full training)
    are read by the loss but never updated and carry no optimizer state.
    `extra` is state a task keeps beside the params and updates after each step
    without gradients (DINO's EMA teacher and centre; empty for most tasks):
    the loss reads it and checkpoints hold it.

    The rng of step s is fold_in(rng, s), so a run resumed at step s draws the
    same dropout and masking noise as one that never stopped."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    extra: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        params,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        frozen=None,
        extra=None,
    ):
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen={} if frozen is None else frozen,
            opt_state=tx.init(params),
            rng=rng,
            extra={} if extra is None else extra,
            tx=tx,
        )

    def apply_gradients(self, grads):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def learning_rate_schedule(
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    end_learning_rate_ratio: float = 0.1,
) -> optax.Schedule:
    """Linear warmup, then cosine decay to `end_learning_rate_ratio` or constant."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            learning_rate,
            max(total_steps - warmup_steps, 1),
            alpha=end_learning_rate_ratio,
        )
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"optimizer.schedule={schedule!r}; expected cosine|constant")
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _decay_mask(params):
    # Matrices decay; biases, norm scales and other vectors do not (as in BERT/GPT).
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    total_steps: int,
    *,
    learning_rate: float,
    warmup_steps: int,
    schedule: str,
    end_learning_rate_ratio: float,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    grad_clip_norm: float,
    **unused,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + decay and global-norm clipping."""
    lr = learning_rate_schedule(
        learning_rate, warmup_steps, total_steps, schedule, end_learning_rate_ratio
    )
    parts = []
    if grad_clip_norm and grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(
        optax.adamw(
            lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask
        )
    )
    return optax.chain(*parts), lr
