"""One Orbax CheckpointManager per workdir: {state, data iterator, config} per step.

Saves are async and atomic (Orbax writes a temporary directory and renames it),
so a crash never leaves a half step that `restore` picks. Restore takes the
abstract state of the *current* mesh: a checkpoint written on 8 devices restores
on 1, or on another mesh shape.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fmjax import storage
from fmjax.train.state import TrainState

# No "frozen": a base model under an adapter is rebuilt from init.model on
# restore, so adapter checkpoints hold the adapter, head and optimizer state only.
# "extra" (a task's EMA teacher, centre) only where the task keeps some.
STATE_FIELDS = ("step", "params", "opt_state", "rng", "extra")


class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes its data-iterator state (a JSON dict keyed by data shard)
    to its own file; restore merges every process's file, so a run resumed with
    another process count still finds the state of each shard it now owns."""

    def save(self, directory: epath.Path, args: DataStateSave):
        index, count = jax.process_index(), jax.process_count()
        path = epath.Path(directory) / f"process_{index}-of-{count}.json"
        path.write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None):
        merged = {}
        for path in sorted(epath.Path(directory).glob("process_*.json")):
            merged.update(json.loads(path.read_text()))
        return merged

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _state_tree(state: TrainState) -> dict:
    tree = {field: getattr(state, field) for field in STATE_FIELDS}
    if not jax.tree.leaves(tree["extra"]):
        del tree["extra"]
    return tree


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = storage.join(workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "data", "loop", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data: dict, loop: dict, config: dict
    ) -> None:
        """`data`: this process's iterator state; `loop`: loop counters (the same
        on every process)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=DataStateSave(data),
                loop=ocp.args.JsonSave(loop),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState):
        """Restores (state, data, loop, config) at `step` onto `shardings`.

        `state.frozen` is not in checkpoints and comes back as `abstract_state`'s;
        the caller rebuilds it (`fmjax.train.loop._restore`)."""
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
                data=DataStateRestore(),
                loop=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = abstract_state.replace(**restored["state"])
        return state, restored["data"], restored["loop"], restored["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
