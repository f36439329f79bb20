"""fmjax decoders in lm-evaluation-harness: its `LM` interface on jitted scoring
and KV-cache generation.

    m = fmjax.load("runs/quickstart")
    lm = FmjaxLM(m, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["rt_sentiment"], num_fewshot=2)

or `fmjax eval --workdir runs/quickstart --tasks rt_sentiment --num-fewshot 2`.

The class derives from lm-eval's `TemplateLM`, so contexts and continuations
are split exactly as its `hf` model splits them (`_encode_pair`: trailing
spaces move to the continuation, the pair is encoded whole and cut at the
context's length; an empty context becomes the prefix token). What is ours:

- `_loglikelihood_tokens`: requests sorted longest first (lm-eval's
  `Collator`), each row (context + continuation)[-(max_length + 1):][:-1] as
  the `hf` model builds it, right-padded to a power-of-two width (>= 16) and
  the batch padded to `batch_size` rows, so a few compiled shapes serve a whole
  task. One jitted call returns each position's target log-probability and
  whether it was the argmax; the host sums the continuation's. Right padding
  cannot change a causal model's earlier logits, so a score does not depend on
  the batch it came in.
- `loglikelihood_rolling`: lm-eval's own rolling windows
  (`get_rolling_token_windows` + `make_disjoint_window`, as `hf`), scored as
  above.
- `generate_until`: fmjax's KV-cache generation (`Generator.complete`), the
  context left-truncated to leave room for `max_gen_toks` (as `hf`), `until`
  strings cut on the host; sampling kwargs (`do_sample`, `temperature`,
  `top_k`, `top_p`) follow HF's meaning.

`add_bos_token` (default True): fmjax's training documents begin with the BOS
token, so every encoded context does too (lm-eval's `hf` model with
`add_bos_token=True` gives the same scores; for GPT-2 BOS is EOS,
<|endoftext|>).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from fmjax.errors import RequestError
from fmjax.inference.fewshot_samplers import (
    SimilarSampler,
    bind_retrieval,
    bind_similar_sampler,
)
from fmjax.inference.sampling import Sampling

# Registers lm-eval's few-shot sampler "similar" (fewshot_config: {sampler: similar}).
from fmjax.inference.scoring import Scorer

# lm-eval's default for generate_until without max_gen_toks.
MAX_GEN_TOKS = 256


class FmjaxLM(TemplateLM):
    """An fmjax decoder (`fmjax.load(path)`) as an lm-evaluation-harness model."""

    def __init__(
        self,
        model,
        batch_size: int = 16,
        max_length: int | None = None,
        add_bos_token: bool = True,
        progress: bool = True,
    ):
        super().__init__()
        cfg = model.module.config
        if cfg.kind != "decoder":
            raise RequestError(
                f"lm-evaluation-harness scores decoders; this model is "
                f"kind={cfg.kind!r}"
            )
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise RequestError(f"batch_size={batch_size!r}: expected an int >= 1")
        self.model = model
        self.tokenizer_ = model.tokenizer
        self._batch_size = batch_size
        self._max_length = int(max_length or cfg.max_len)
        if self._max_length < 2:
            raise RequestError(f"max_length={self._max_length}: expected >= 2")
        self.add_bos_token = add_bos_token
        self.progress = progress

    # --- what lm-eval asks of a model -------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw):
        ids = list(self.tokenizer_.encode(string))
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return [self.prefix_token_id, *ids] if bos else ids

    def tok_decode(self, tokens: Sequence[int], **kw) -> str:
        return self.tokenizer_.decode(list(tokens))

    # --- scoring ----------------------------------------------------------------------

    @functools.cached_property
    def _scorer(self) -> Scorer:
        return Scorer(
            self.model.module, self.batch_size, self.max_length, self.tokenizer_.pad_id
        )

    def _rows(self, requests):
        """Inputs, targets and continuation lengths of requests, as `hf` builds
        them: the last max_length + 1 tokens, inputs without the last."""
        rows = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise RequestError(
                    "a loglikelihood request needs context and continuation tokens; "
                    f"got {len(context_enc)} and {len(continuation_enc)}"
                )
            if len(continuation_enc) > self.max_length:
                raise RequestError(
                    f"continuation of {len(continuation_enc)} tokens > max_length "
                    f"{self.max_length}"
                )
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation_enc)))
        return rows

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """Requests packed as prefix trees (`fmjax.inference.scoring`): shared
        context tokens are computed once, and the LM head reads only the
        continuations' positions."""
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or not self.progress,
            desc="loglikelihood",
        )
        results = self._scorer.score(
            self.model.params, self.model.model_kwargs, self._rows(requests), bar.update
        )
        bar.close()
        for request, result in zip(requests, results, strict=True):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows.extend((None, *w) for w in rolling)
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, start = [], 0
        for req, count in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[start : start + count])
            start += count
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # --- generation -------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or not self.progress,
            desc="generate_until",
        )
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until, max_new, sampling, seed = _generation_args(kwargs)
            room = self.max_length - max_new
            if room < 1:
                raise RequestError(
                    f"max_gen_toks={max_new} leaves no room for a context in "
                    f"max_length={self.max_length}"
                )
            # Longest first: similar lengths share a batch (as `hf`).
            order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in order]
            for start in range(0, len(order), self.batch_size):
                texts = self.model._generator.complete(
                    prompts[start : start + self.batch_size],
                    max_new,
                    sampling,
                    seed,
                    until,
                    self.batch_size,
                )
                for i, text in zip(order[start:], texts, strict=False):
                    out[i] = text
                    self.cache_hook.add_partial(
                        "generate_until", requests[i].args, text
                    )
                    bar.update(1)
        bar.close()
        return out


def _generation_args(kwargs: dict):
    """(until, max_gen_toks, Sampling, seed) from lm-eval's gen_kwargs."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list | tuple):
        raise RequestError(f"until={until!r}: expected a string or a list of them")
    max_new = int(kwargs.pop("max_gen_toks", MAX_GEN_TOKS))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0))
    top_k = int(kwargs.pop("top_k", 0) or 0)
    top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
    seed = int(kwargs.pop("seed", 0))
    if not do_sample:
        temperature = 0.0  # as HF: greedy unless sampling is asked for
    elif temperature == 0.0:
        temperature = 1.0
    return list(until), max_new, Sampling(temperature, top_k, top_p), seed


# --- running tasks --------------------------------------------------------------------

# The task YAMLs fmjax ships (with their JSONL data): tasks/NAME.yaml.
TASKS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "tasks"
)


def shipped_tasks() -> list[str]:
    if not os.path.isdir(TASKS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(TASKS_DIR) if f.endswith(".yaml"))


def task_config(spec: str):
    """A task for `lm_eval.simple_evaluate`: a YAML file's config (its relative
    `data_files` and `include`s resolved against the file's folder, so it runs
    from any directory), a shipped task's by name, or else lm-eval's own task
    name as given."""
    path = spec
    if not spec.endswith((".yaml", ".yml")) and spec in shipped_tasks():
        path = os.path.join(TASKS_DIR, f"{spec}.yaml")
    elif not spec.endswith((".yaml", ".yml")):
        return spec
    if not os.path.isfile(path):
        raise RequestError(f"task file {path!r} does not exist")
    # lm-eval's own YAML reader (`include`, `!function`); TaskManager would
    # read data_files relative to the working directory instead.
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(os.path.abspath(path))
    files = config.get("dataset_kwargs", {}).get("data_files")
    if files is not None:
        folder = _declaring_folder(os.path.abspath(path), load_yaml)
        config["dataset_kwargs"] = dict(config["dataset_kwargs"])
        config["dataset_kwargs"]["data_files"] = _resolve(files, folder)
    return config


def _declaring_folder(path: str, load_yaml) -> str:
    """The folder of the YAML that sets `dataset_kwargs`: `path`'s own, or that
    of the file it includes (followed as lm-eval does, relative to `path`)."""
    raw = load_yaml(path, resolve_func=False, recursive=False)
    include = raw.get("include")
    if "dataset_kwargs" in raw or not isinstance(include, str):
        return os.path.dirname(path)
    included = os.path.abspath(os.path.join(os.path.dirname(path), include))
    return _declaring_folder(included, load_yaml)


def _resolve(files, folder):
    if isinstance(files, str):
        return files if os.path.isabs(files) else os.path.join(folder, files)
    if isinstance(files, dict):
        return {k: _resolve(v, folder) for k, v in files.items()}
    return [_resolve(f, folder) for f in files]


def evaluate(
    lm,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 0,
    fewshot_encoder=None,
    log_samples: bool = False,
    retrieve: dict | None = None,
) -> dict:
    """`lm_eval.simple_evaluate` on `lm` (an FmjaxLM, or any lm-eval model, so
    others run with the same settings; every seed fixed): its results dict,
    with the logged samples (each document's requests and responses) only when
    `log_samples`.

    Tasks whose few-shot sampler is "similar" are bound to `fewshot_encoder`
    (a directory `fmjax.load` reads, a loaded encoder, or None for
    all-MiniLM-L6-v2; see fmjax.inference.prompting) before they run: lm-eval
    does not show a sampler the document it picks examples for.

    `retrieve` ({"index": Index or directory, "k": 3, "template": ""})
    puts each document's nearest passages in front of its context
    (`fmjax.inference.fewshot_samplers.bind_retrieval`)."""
    import lm_eval
    from lm_eval.evaluator_utils import get_sample_size

    specs = [task_config(t) for t in tasks]
    # lm-eval's own tasks come by name, from its index of every task it ships.
    manager = _task_manager(any(isinstance(spec, str) for spec in specs))
    built = []
    for spec in specs:
        loaded = manager.load(spec)
        for task in loaded["tasks"].values():
            similar = isinstance(getattr(task, "sampler", None), SimilarSampler)
            if not (similar or retrieve):
                continue
            # The documents the run asks about, embedded up front in one go.
            docs = task.doc_iterator(limit=get_sample_size(task, limit))
            queries = [doc for _, doc in docs]
            if similar:
                bind_similar_sampler(task, fewshot_encoder, queries)
            if retrieve:
                bind_retrieval(task, queries=queries, **retrieve)
        # The outermost groups and tasks: a group holds its members.
        members = {id(item) for group in loaded["groups"].values() for item in group}
        built += [
            item
            for item in (*loaded["groups"].values(), *loaded["tasks"].values())
            if id(item) not in members
        ]
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=built,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=1000,  # closed-form stderr for acc and exact_match
    )
    keep = ("results", "configs", "n-shot", "versions", "higher_is_better", "n-samples")
    return {
        k: v for k, v in out.items() if k in keep or (log_samples and k == "samples")
    }


@functools.cache
def _task_manager(lm_eval_tasks: bool):
    """A TaskManager, one per process: with `lm_eval_tasks` it indexes every
    task YAML lm-eval ships (about 10 s), which configs of fmjax's own YAMLs
    do not need. Each `load` builds fresh tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=lm_eval_tasks, metadata={})


def headline_metric(task_results: dict) -> str:
    """The metric a table row shows: acc, else the first exact_match (its
    flexible-extract filter where there is one), else the first number."""
    keys = [k for k, v in task_results.items() if "," in k and "_stderr" not in k]
    for prefix in ("acc,", "exact_match,flexible-extract", "exact_match,"):
        for key in keys:
            if key.startswith(prefix):
                return key
    return keys[0]


def evaluate_shots(
    lm: FmjaxLM,
    tasks: Sequence[str],
    shots: Sequence[int | None],
    limit: int | float | None = None,
    out_dir: str | None = None,
    plot: bool = False,
    **options,
) -> dict:
    """`evaluate` once per few-shot count; with `out_dir`, writes
    results.json (every metric per k), results.md (a table of task x metric
    per k) and, with `plot`, accuracy_vs_shots.png. `options`: evaluate's
    (fewshot_encoder, retrieve)."""
    runs = {}
    for k in shots:
        runs["default" if k is None else str(k)] = evaluate(
            lm, tasks, k, limit, **options
        )
    table = shots_table(runs)
    out = {"shots": runs, "table": table}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(_plain(runs), f, indent=2)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(format_table(table) + "\n")
        if plot:
            out["plot"] = plot_shots(
                table, os.path.join(out_dir, "accuracy_vs_shots.png")
            )
    return out


def shots_table(runs: dict) -> list[dict]:
    """[{task, metric, k: value, ...}] from `evaluate` results per k."""
    rows: dict[tuple, dict] = {}
    for k, run in runs.items():
        for task, results in run["results"].items():
            metric = headline_metric(results)
            row = rows.setdefault((task, metric), {"task": task, "metric": metric})
            row[k] = float(results[metric])
    return list(rows.values())


def format_table(table: list[dict]) -> str:
    shots = [k for k in table[0] if k not in ("task", "metric")] if table else []
    lines = [
        "| task | metric | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---|---|" + "---:|" * len(shots),
    ]
    for row in table:
        values = " | ".join(f"{row[k]:.4f}" for k in shots)
        lines.append(f"| {row['task']} | {row['metric']} | {values} |")
    return "\n".join(lines)


def plot_shots(table: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table:
        shots = [k for k in row if k not in ("task", "metric") and k != "default"]
        ax.plot(
            [int(k) for k in shots],
            [row[k] for k in shots],
            "o-",
            label=f"{row['task']} ({row['metric'].split(',')[0]})",
        )
    ax.set_xlabel("few-shot examples (k)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plain(value):
    """JSON-ready: numpy scalars as floats, anything else unknown as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
