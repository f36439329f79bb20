"""The Task protocol: everything a run needs from its objective, and nothing else.

    task = task_for(config)                 # validated and resolved; input untouched
    task.config                             # the resolved config (config.json)
    task.model_config                       # -> fmjax.models.build_model
    task.abstract_batch(rows)               # {name: ShapeDtypeStruct}
    task.train_iterator() / task.eval_iterator(split) / task.empty_batch(rows)
    task.loss_fn(model, adaptation)         # (params, frozen, batch, rng, train,
                                            #  extra) -> metric sums
    task.init_extra(params) / task.update_extra  # state beside the params
    task.constrain_params                   # params projected after each update
    task.summarize(sums)                    # -> reported metrics
    task.throughput(local_batch)            # how many `throughput_unit`s it holds
    task.evaluators                         # extra evals at the end of training
    task.adaptation                         # full, lora, qlora, prefix or prompt
    task.export(workdir, trained, frozen)   # what a finished run writes

The loop, `fmjax bench`, `fmjax compile`, `fmjax.load` and the CLI use only
this. A new objective is one module in `fmjax/tasks/` with a subclass of
`Task`, and one line in `fmjax.tasks.TASKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from fmjax.adapt.methods import Adaptation
from fmjax.config import ConfigError
from fmjax.data.sharded import ShardedIterator

# loss_fn(params, frozen, batch, rng, train, extra) -> metric sums: "loss_sum"
# (what is differentiated), "count" (what it is divided by) and any sums the
# task names; `extra` is the task's state beside the params (TrainState.extra).
LossFn = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may read after training: the task, the model and its
    params, and `evaluate(split)`, the task's metrics over a whole split."""

    task: Task
    model: Any
    params: Any
    frozen: Any
    evaluate: Callable[[str], dict]


@dataclasses.dataclass(frozen=True)
class SplitEvaluator:
    """The task's own metrics on another split, reported as `name`."""

    split: str
    name: str

    def __call__(self, context: EvalContext) -> dict:
        return context.evaluate(self.split)


class Task:
    """Base of every task; subclasses fill in data, model inputs and the loss.

    Constructed only by `from_config`, which checks the config and resolves
    everything that depends on data or a pretrained model before any compute.
    `with_data=False` skips the data (for `fmjax compile` and `bench memory`,
    which need shapes only).
    """

    objectives: ClassVar[tuple[str, ...]] = ()
    throughput_unit: ClassVar[str] = "tokens"
    # Params the model has and init.model need not (a new task head).
    new_param_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config,
        model_config,
        *,
        tokenizer=None,
        pretrained: Mapping | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.pretrained = pretrained
        self.batch_size = config.data.batch_size
        self.seed = config.train.seed
        self.eval_split = config.data.eval_split
        try:
            self.adaptation = Adaptation.from_config(config.adapt, model_config)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_config(cls, config, *, with_data: bool = True) -> Task:
        raise NotImplementedError

    # --- data ---------------------------------------------------------------------

    def abstract_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a batch of `rows` rows."""
        raise NotImplementedError

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        """A batch that counts for nothing (zero weights / segment ids), which a
        process with no eval rows left feeds while the others finish."""
        return {
            k: np.zeros(s.shape, s.dtype) for k, s in self.abstract_batch(rows).items()
        }

    def train_iterator(self):
        """This process's share of the global train batches; `get_state()` and
        `set_state()` go into checkpoints."""
        raise NotImplementedError

    def sharded_iterator(self, shard: Callable[[int, int, int], Any]):
        """This process's share of global batches drawn from `num_shards(config)`
        pipelines, whatever the process count: `shard(index, count, rows)` is
        pipeline `index` of `count`, giving `rows` examples a batch."""
        return ShardedIterator(
            shard,
            num_shards=num_shards(self.config),
            batch_size=self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_iterator(self, split: str | None = None):
        """This process's share of `split` (default the run's eval split), every
        example once."""
        raise NotImplementedError

    def throughput(self, local_batch: Mapping[str, np.ndarray]) -> int:
        """How many `throughput_unit`s a local batch holds (host-side)."""
        raise NotImplementedError

    # --- model and loss -------------------------------------------------------------

    def loss_fn(self, model, adaptation: Adaptation | None = None) -> LossFn:
        raise NotImplementedError

    def init_extra(self, params) -> Any:
        """State the task keeps beside the params (`TrainState.extra`, in
        checkpoints), made from the initial trained params inside the jitted
        init; the loss reads it. Default: none."""
        del params
        return {}

    # update_extra(extra, new_params, sums, step) -> (extra, sums), jitted into
    # the train step after the optimizer update; None: `extra` never changes.
    update_extra: Callable[..., tuple] | None = None

    # constrain_params(params) -> params, jitted into the train step right after
    # the optimizer update (a clamp on a temperature); None: no constraint.
    constrain_params: Callable[..., Any] | None = None

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, float]:
        """Reported metrics from summed ones (default: loss and count)."""
        count = max(float(sums["count"]), 1e-8)
        return {"loss": float(sums["loss_sum"]) / count, "count": float(sums["count"])}

    @property
    def evaluators(self) -> tuple:
        """Run after the final eval; each gives metrics reported under its name."""
        return ()

    def summary(self) -> dict:
        """Extra facts about the run for summary.json."""
        return {}

    def sample(self, context: EvalContext) -> dict:
        """What the trained model makes of one input, for a person to read (a
        decoder's continuation of held-out text); printed at the end of
        training and kept in summary.json. Default: nothing."""
        return {}

    # --- output -------------------------------------------------------------------

    def save_assets(self, directory: str) -> None:
        """Files a model needs besides its weights (the tokenizer)."""
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def export(self, workdir: str, trained_params, frozen_params=None) -> str:
        """WORKDIR/export/: the whole model (full training, frozen params
        included), or for adapter methods only the trained params (adapter +
        head), whose base stays where init.model points."""
        from fmjax.export import ADAPTER_WEIGHTS, MODEL_WEIGHTS, export

        if self.adaptation.method == "full":
            params, _ = self.adaptation.merged(trained_params, frozen_params or {})
            return export(
                workdir, params, self.config, self.tokenizer, weights=MODEL_WEIGHTS
            )
        return export(
            workdir,
            trained_params,
            self.config,
            self.tokenizer,
            weights=ADAPTER_WEIGHTS,
        )


def on_process_zero_first(fn):
    """fn() on process 0, then (after it built shared files) on the others."""
    if jax.process_index() == 0:
        result = fn()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fmjax: data prepared")
        if jax.process_index() != 0:
            result = fn()
    return result


def validate_sizes(config, *extra_positive: tuple[str, str]) -> None:
    """Positive sizes and a global batch that splits over accumulation steps,
    processes and data shards."""
    for group, key in [
        ("train", "steps"),
        ("train", "log_every"),
        ("data", "batch_size"),
        ("checkpoint", "every"),
        ("optimizer", "grad_accum_steps"),
        *extra_positive,
    ]:
        value = config[group][key]
        if value < 1:
            raise ConfigError(f"{group}.{key}={value}: expected a positive integer")
    batch, accum = config.data.batch_size, config.optimizer.grad_accum_steps
    if batch % accum:
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by "
            f"optimizer.grad_accum_steps={accum}"
        )


def validate_data_shards(config) -> None:
    """The global batch splits over the data shards, and they over processes."""
    batch = config.data.batch_size
    processes = jax.process_count()
    shards = num_shards(config)
    if batch % shards:
        raise ConfigError(
            f"data.num_shards={shards} does not divide data.batch_size={batch}"
        )
    if shards % processes:
        raise ConfigError(
            f"data.num_shards={shards} is not a multiple of the {processes} "
            f"processes: this config runs on process counts that divide {shards}"
        )


def num_shards(config) -> int:
    """Independent data pipelines that make up the global batch (`data.num_shards`;
    0 means one per process, which ties the batches to the process count)."""
    return config.data.get("num_shards", 0) or jax.process_count()
