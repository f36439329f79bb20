"""Few-shot samplers for lm-evaluation-harness task YAMLs, and retrieval.

The selection "similar" of `fmjax.inference.prompting` is lm-eval's
few-shot sampler "similar", registered in
`lm_eval.api.samplers.SAMPLER_REGISTRY` when this module is imported (as
`fmjax.inference.lm_eval` does), so a task YAML can say

    fewshot_config:
      sampler: similar

lm-eval 0.4.13 shows a sampler the query document only when the few-shot split
is the test split (`ConfigurableTask.fewshot_context` passes `eval_doc`, to
leave it out of its own examples), so a task using the sampler is bound first:
`bind_similar_sampler(task, encoder, queries)` hands the sampler the task's
`doc_to_text` and wraps that task's `fewshot_context` to tell the sampler each
query. `fmjax.inference.lm_eval.evaluate(..., fewshot_encoder=)` does this for
every such task; an unbound sampler raises an error saying so. The sampler
"in_context" takes a document's own examples (its `context` list), for
in-context learning probes whose label mapping is fresh in every document
(tasks/icl_heldout.yaml).

`bind_retrieval(task, index, k)` makes every context a task builds start with
the passages of a search index nearest the document's question.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fmjax.errors import RequestError
from fmjax.inference.prompting import TextEmbedder, nearest_last, text_embedder

try:
    from lm_eval.api.samplers import SAMPLER_REGISTRY, ContextSampler
except ModuleNotFoundError:  # lm-eval is the [eval] extra
    SAMPLER_REGISTRY, ContextSampler = None, object


class SimilarSampler(ContextSampler):
    """lm-eval's few-shot sampler "similar": the n few-shot docs whose
    `doc_to_text` is most cosine-similar to the query doc's, the most similar
    last. Needs `bind_similar_sampler(task, ...)` first (lm-eval does not show
    a sampler its query)."""

    def __init__(self, df=None, *, rnd=None, fewshot_indices=None, **kwargs):
        super().__init__(df, rnd=rnd, fewshot_indices=fewshot_indices, **kwargs)
        self.embedder: TextEmbedder | None = None
        self.pool_text: Callable | None = None  # few-shot doc -> its prompt text
        self.query_text: Callable | None = None  # query doc -> its prompt text
        self.query = None  # the doc whose context is being built
        self.upcoming: list = []  # query docs to embed together on first use
        self._pool_ND: np.ndarray | None = None

    def sample(self, n: int, eval_doc=None, df=None, **kwargs) -> list:
        if not isinstance(n, int) or n < 0:
            raise RequestError(f"n={n!r} few-shot examples: expected an int >= 0")
        if n == 0:
            return []
        if df:
            self.replace_df(df)
            self._pool_ND = None
        if self.embedder is None or self.query is None:
            raise RequestError(
                "the 'similar' few-shot sampler needs each query document: run the "
                "task with fmjax.inference.lm_eval.evaluate, or call "
                "fmjax.inference.fewshot_samplers.bind_similar_sampler(task, "
                "encoder) on the built task first"
            )
        pool = self.fewshot_docs()
        if self._pool_ND is None:
            self._pool_ND = self.embedder([self._text(self.pool_text, d) for d in pool])
        if self.upcoming:
            self.embedder([self._text(self.query_text, d) for d in self.upcoming])
            self.upcoming = []
        query_D = self.embedder([self._text(self.query_text, self.query)])[0]
        # The query itself is no example of itself (lm-eval passes eval_doc
        # when the few-shot split is the test split).
        keep = None if eval_doc is None else [d != eval_doc for d in pool]
        return [pool[i] for i in nearest_last(self._pool_ND, query_D, n, keep)]

    @staticmethod
    def _text(doc_to_text: Callable, doc) -> str:
        text = doc_to_text(doc)
        if not isinstance(text, str):
            raise RequestError(
                f"the 'similar' sampler embeds doc_to_text's string; this task's "
                f"gives {type(text).__name__} {text!r}"
            )
        return text


class InContextSampler(ContextSampler):
    """lm-eval's few-shot sampler "in_context": a document's own examples, the
    first n of its `context` list (dicts the task's few-shot `doc_to_text` and
    `doc_to_target` read), shuffled by the sampler's seed. For probes whose
    examples belong to one document, such as in-context learning with a label
    mapping fresh in every sequence (`fmjax.data.icl`). lm-eval passes the
    sampler its document only when the few-shot split is the test split, so
    such a task sets `fewshot_split` to its `test_split`."""

    def sample(self, n: int, eval_doc=None, df=None, **kwargs) -> list:
        if not isinstance(n, int) or n < 0:
            raise RequestError(f"n={n!r} few-shot examples: expected an int >= 0")
        if n == 0:
            return []
        if eval_doc is None:
            raise RequestError(
                "the 'in_context' few-shot sampler takes each document's own "
                "`context`: set the task's fewshot_split to its test_split, so "
                "lm-eval passes the sampler the document"
            )
        context = eval_doc.get("context") if isinstance(eval_doc, Mapping) else None
        if not isinstance(context, list) or n > len(context):
            have = len(context) if isinstance(context, list) else "no"
            raise RequestError(
                f"num_fewshot={n}: this document has {have} `context` examples; "
                "the 'in_context' sampler takes at most that many"
            )
        shots = list(context[:n])
        self.rnd.shuffle(shots)
        return shots


if SAMPLER_REGISTRY is not None:
    SAMPLER_REGISTRY["similar"] = SimilarSampler
    SAMPLER_REGISTRY["in_context"] = InContextSampler


def bind_similar_sampler(task, encoder=None, queries: Iterable = ()) -> None:
    """Readies a built lm-eval task whose few-shot sampler is "similar": the
    sampler embeds few-shot docs by the task's few-shot `doc_to_text` and
    queries by its `doc_to_text` with `encoder` (as `text_embedder` takes it),
    and this task's `fewshot_context` tells it each query. `queries`: the docs
    the run will ask about, embedded together when the first is."""
    sampler = getattr(task, "sampler", None)
    if not isinstance(sampler, SimilarSampler):
        raise RequestError(
            f"task {getattr(task, 'task_name', task)!r} has few-shot sampler "
            f"{type(sampler).__name__}: expected fewshot_config: {{sampler: similar}}"
        )
    sampler.embedder = text_embedder(encoder)
    sampler.pool_text = functools.partial(
        task.doc_to_text, doc_to_text=task.fewshot_cfg.doc_to_text
    )
    sampler.query_text = task.doc_to_text
    sampler.upcoming = list(queries)
    fewshot_context = task.fewshot_context

    @functools.wraps(fewshot_context)
    def fewshot_context_with_query(doc, *args, **kwargs):
        sampler.query = doc
        try:
            return fewshot_context(doc, *args, **kwargs)
        finally:
            sampler.query = None

    task.fewshot_context = fewshot_context_with_query


def bind_retrieval(task, index, k: int = 3, template: str = "", queries=()) -> None:
    """Readies a built lm-eval task so every context it builds starts with the
    `k` passages of `index` (an `fmjax.inference.search.Index` or its
    directory) nearest the document's question (its `doc_to_text`), placed by
    `template` as `fmjax.inference.search.augment` places them (default: the
    passages, a blank line, then the context, few-shot examples included).
    `queries`: the docs the run will ask about, searched together up front."""
    from fmjax.inference.search import Index, augment

    if not isinstance(index, Index):
        index = Index.load(index)
    found: dict[str, list] = {}

    def passages(question: str):
        if question not in found:
            found[question] = index.search_texts([question], k)[0]
        return found[question]

    questions = [task.doc_to_text(doc) for doc in queries]
    if questions and all(isinstance(q, str) for q in questions):
        unique = list(dict.fromkeys(questions))
        found.update(zip(unique, index.search_texts(unique, k), strict=True))
    fewshot_context = task.fewshot_context

    @functools.wraps(fewshot_context)
    def fewshot_context_with_passages(doc, *args, **kwargs):
        context = fewshot_context(doc, *args, **kwargs)
        question = task.doc_to_text(doc)
        if not isinstance(context, str) or not isinstance(question, str):
            raise RequestError(
                f"task {task.task_name!r} builds {type(context).__name__} contexts; "
                "retrieval augments text contexts only"
            )
        return augment(context, passages(question), template)

    task.fewshot_context = fewshot_context_with_passages
