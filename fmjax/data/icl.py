"""Sequences for studying in-context learning, a token version of the
data-distribution experiments of Chan et al. 2022 ("Data distributional
properties drive emergent in-context learning in transformers") and Reddy
2023 ("The mechanistic basis of data dependence and abrupt learning in an
in-context classification task").

A sequence is `context` (item, label) pairs and a query item, as words:

    s12 s40 L3 s7 s33 L11 s12 s40 L3 ... s12 s40      ->  completion " L3"

A causal model reads it whole and learns only the query's label (the
prompt/completion rows of `fmjax.data.documents`: `data.name=jsonl:FILE`).

- An item is a pair of symbols `s0 ... s{num_symbols-1}` (two tokens), so a
  class is a combination of symbols, as an image is a combination of
  features: recognising a class takes computation, and a class never trained
  on is made of symbols that were. A seeded permutation of all symbol pairs
  gives the `num_classes` trained classes, then the `num_heldout` held-out
  ones.
- Trained classes are drawn with Zipfian frequencies (class of rank r with
  probability proportional to r^-zipf; rank = index), each with a fixed label
  `L0 ... L{num_labels-1}` (a seeded, balanced assignment), which the weights
  can learn ("in-weights" learning).
- With probability `bursty` a sequence is bursty: its context holds the
  query's class and one other class, `context/2` times each, in a random
  order; otherwise its context items are drawn independently from the Zipf
  distribution, like its query (which then rarely appears in the context).
- Held-out classes never appear in training. In an evaluation sequence a
  held-out query and one other held-out class get two distinct random
  labels, fresh for every sequence: only the context tells the answer, so
  accuracy above chance (1/num_labels) is in-context learning.

Every symbol and label is one token of a word-level SentencePiece model that
`write_tokenizer` builds. The evaluation documents are lm-eval tasks
(tasks/icl_heldout.yaml, tasks/icl_inweights.yaml) whose few-shot examples
are each document's own `context` (the "in_context" sampler of
`fmjax.inference.prompting`), so `fmjax eval --num-fewshot 0,1,2,4,8` gives
accuracy against the number of shots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator

import numpy as np

from fmjax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


@dataclasses.dataclass(frozen=True)
class IclSpec:
    num_classes: int = 2048
    num_heldout: int = 64
    num_symbols: int = 64  # an item is two of them: num_symbols^2 possible classes
    num_labels: int = 32
    context: int = 8  # (item, label) pairs before the query
    bursty: float = 0.9  # probability that a sequence is bursty
    zipf: float = 1.0  # exponent of the class frequencies (0: uniform)
    seed: int = 0  # the label assignment; sequences take their own seed

    def __post_init__(self):
        checks = {
            "num_classes": self.num_classes >= 2,
            "num_heldout": self.num_heldout >= 2,
            "num_labels": self.num_labels >= 2,
            "context": self.context >= 2 and self.context % 2 == 0,
            "num_symbols": self.num_symbols**2 >= self.num_classes + self.num_heldout,
            "bursty": 0.0 <= self.bursty <= 1.0,
            "zipf": self.zipf >= 0.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: expected "
                    + {
                        "context": "an even number >= 2 (half query class, half "
                        "another in a bursty sequence)",
                        "bursty": "a probability in [0, 1]",
                        "zipf": "an exponent >= 0",
                        "num_symbols": "enough symbol pairs for num_classes + "
                        "num_heldout classes",
                    }.get(name, "an int >= 2")
                )

    def _pairs(self) -> np.ndarray:
        """[num_classes + num_heldout] symbol-pair indices, trained first."""
        needed = self.num_classes + self.num_heldout
        rng = np.random.default_rng(self.seed)
        return rng.permutation(self.num_symbols**2)[:needed]

    def item(self, cls: int) -> str:
        pair = int(self._pair_table[cls])
        return f"s{pair // self.num_symbols} s{pair % self.num_symbols}"

    def heldout_item(self, cls: int) -> str:
        return self.item(self.num_classes + cls)

    def label(self, index: int) -> str:
        return f"L{index}"

    @functools.cached_property
    def _pair_table(self) -> np.ndarray:
        return self._pairs()

    def labels_of_classes(self) -> np.ndarray:
        """The fixed label index of each trained class: a seeded permutation of
        the classes dealt round-robin, so every label has as many classes."""
        order = np.random.default_rng(self.seed + 1).permutation(self.num_classes)
        labels = np.empty(self.num_classes, np.int64)
        labels[order] = np.arange(self.num_classes) % self.num_labels
        return labels

    def class_probabilities(self) -> np.ndarray:
        weights = np.arange(1, self.num_classes + 1, dtype=np.float64) ** -self.zipf
        return weights / weights.sum()

    def words(self) -> list[str]:
        """Every token a sequence can hold."""
        symbols = [f"s{i}" for i in range(self.num_symbols)]
        return symbols + [self.label(i) for i in range(self.num_labels)]


def _text(pairs: list[tuple[str, str]], query: str) -> str:
    return " ".join(f"{item} {label}" for item, label in pairs) + f" {query}"


def training_sequences(spec: IclSpec, n: int, seed: int) -> Iterator[dict]:
    """`n` prompt/completion rows of the training distribution."""
    rng = np.random.default_rng(seed)
    labels_C = spec.labels_of_classes()
    probs_C = spec.class_probabilities()
    half = spec.context // 2
    for _ in range(n):
        if rng.random() < spec.bursty:
            query, other = rng.choice(spec.num_classes, 2, replace=False, p=probs_C)
            classes = np.array([query] * half + [other] * half)
            rng.shuffle(classes)
        else:
            classes = rng.choice(spec.num_classes, spec.context, p=probs_C)
            query = rng.choice(spec.num_classes, p=probs_C)
        pairs = [(spec.item(c), spec.label(labels_C[c])) for c in classes]
        yield {
            "prompt": _text(pairs, spec.item(query)),
            "completion": " " + spec.label(labels_C[query]),
        }


def heldout_documents(spec: IclSpec, n: int, seed: int) -> list[dict]:
    """lm-eval documents of held-out classes: `item` and `label` of the query,
    and `context`, `spec.context` exemplars alternating between the query's
    class and another held-out class (the query's first, so any k >= 1 of
    them show it), with two distinct random labels fresh for each document."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        query, other = rng.choice(spec.num_heldout, 2, replace=False)
        label_q, label_o = rng.choice(spec.num_labels, 2, replace=False)
        context = [
            {
                "item": spec.heldout_item(query if i % 2 == 0 else other),
                "label": spec.label(label_q if i % 2 == 0 else label_o),
            }
            for i in range(spec.context)
        ]
        docs.append(
            {
                "item": spec.heldout_item(query),
                "label": spec.label(label_q),
                "context": context,
            }
        )
    return docs


def inweights_documents(spec: IclSpec, n: int, seed: int) -> list[dict]:
    """lm-eval documents of the `n` most frequent trained classes: the query
    with its fixed label, and a `context` of `spec.context` exemplars of other
    trained classes (Zipf-drawn, with their fixed labels) that never shows the
    query's class, as Chan et al. measure in-weights learning: with k = 0 or
    k = context examples, only what the weights learned answers."""
    rng = np.random.default_rng(seed)
    labels_C = spec.labels_of_classes()
    probs_C = spec.class_probabilities()
    docs = []
    for query in range(min(n, spec.num_classes)):
        others = np.delete(np.arange(spec.num_classes), query)
        p = np.delete(probs_C, query)
        classes = rng.choice(others, spec.context, p=p / p.sum())
        context = [
            {"item": spec.item(c), "label": spec.label(labels_C[c])} for c in classes
        ]
        docs.append(
            {
                "item": spec.item(query),
                "label": spec.label(labels_C[query]),
                "context": context,
            }
        )
    return docs


def write_training_file(spec: IclSpec, path: str, n: int, seed: int, n_val: int):
    """`n` train rows and `n_val` validation rows (a `split` column) as JSONL."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        rows = training_sequences(spec, n + n_val, seed)
        for i, row in enumerate(rows):
            row["split"] = "train" if i < n else "validation"
            f.write(json.dumps(row) + "\n")


def write_tokenizer(spec: IclSpec, path: str) -> SentencePieceTokenizer:
    """A word-level SentencePiece model in which every symbol and label is one
    token (checked)."""
    words = spec.words()
    # Each word twice, so SentencePiece keeps every one as a piece.
    tokenizer = train_sentencepiece(
        [" ".join(words)] * 2, len(words) + 300, path, "word", hard_vocab_limit=False
    )
    for word in words:
        ids = tokenizer.encode(word)
        if len(ids) != 1:
            raise RuntimeError(f"{word!r} is {len(ids)} tokens in {path}, not one")
    return tokenizer
