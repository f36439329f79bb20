"""One Orbax CheckpointManager per workdir: {state, data iterator, config} per step.

Saves are async and atomic (Orbax writes a temporary directory and renames it),
so a crash never leaves a half step that `restore` picks. Restore takes the
abstract state of the *current* mesh: a checkpoint written on 8 devices restores
on 1, or on another mesh shape.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from fmjax.train.state import TrainState

STATE_FIELDS = ("step", "params", "opt_state", "rng")


def _state_tree(state: TrainState) -> dict:
    return {field: getattr(state, field) for field in STATE_FIELDS}


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
        """Restores (state, data, config) at `step` onto `shardings`."""
        target = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=sharding
            ),
            _state_tree(abstract_state),
            _state_tree(shardings),
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = abstract_state.replace(**restored["state"])
        return state, restored["data"], restored["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
