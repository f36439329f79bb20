"""The in-context learning data (fmjax.data.icl), its lm-eval tasks and their
"in_context" sampler, and `data.tokenizer` given as a file."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from conftest import REPO

from fmjax.config import ConfigError, load_config
from fmjax.data import icl
from fmjax.tasks import task_for

SPEC = icl.IclSpec(num_classes=200, num_heldout=16, num_symbols=16, bursty=0.5)


def _items_and_labels(prompt: str):
    words = prompt.split()
    pairs = [(" ".join(words[i : i + 2]), words[i + 2]) for i in range(0, 24, 3)]
    return pairs, " ".join(words[24:])


def test_training_sequences_follow_the_spec():
    labels = SPEC.labels_of_classes()
    assert Counter(labels.tolist()) == Counter(
        {i: len(labels) // SPEC.num_labels for i in range(SPEC.num_labels)}
        | {i: len(labels) // SPEC.num_labels + 1 for i in range(200 % 32)}
    )
    label_of = {SPEC.item(c): SPEC.label(labels[c]) for c in range(200)}
    heldout = {SPEC.heldout_item(h) for h in range(SPEC.num_heldout)}
    assert len(set(label_of) | heldout) == 216  # distinct symbol pairs
    bursty = 0
    for row in icl.training_sequences(SPEC, 400, seed=3):
        pairs, query = _items_and_labels(row["prompt"])
        assert row["completion"] == " " + label_of[query]
        assert all(label_of[item] == label for item, label in pairs)
        counts = Counter(item for item, _ in pairs)
        if counts[query] == 4 and len(counts) == 2:
            bursty += 1
    # Bursty (p = 0.5): the query's class and one other, four times each; a
    # non-bursty context is that way with negligible probability.
    assert 160 < bursty < 240
    # Zipf: rank 0 is the most common class.
    queries = Counter(
        _items_and_labels(r["prompt"])[1]
        for r in icl.training_sequences(SPEC, 400, seed=4)
    )
    assert queries.most_common(1)[0][0] == SPEC.item(0)


def test_evaluation_documents_hide_or_give_the_answer_as_intended():
    trained = {SPEC.item(c) for c in range(SPEC.num_classes)}
    for doc in icl.heldout_documents(SPEC, 50, seed=0):
        context = doc["context"]
        assert doc["item"] not in trained and len(context) == SPEC.context
        assert context[0] == {"item": doc["item"], "label": doc["label"]}
        assert {c["item"] for c in context[::2]} == {doc["item"]}
        assert {c["label"] for c in context[::2]} == {doc["label"]}
        (other,) = {c["item"] for c in context[1::2]}
        assert other not in trained and other != doc["item"]
        assert context[1]["label"] != doc["label"]
    labels = SPEC.labels_of_classes()
    docs = icl.inweights_documents(SPEC, 10, seed=0)
    assert [d["item"] for d in docs] == [SPEC.item(c) for c in range(10)]
    for c, doc in enumerate(docs):
        assert doc["label"] == SPEC.label(labels[c])
        assert doc["item"] not in {e["item"] for e in doc["context"]}


def test_every_symbol_and_label_is_one_token(tmp_path):
    tokenizer = icl.write_tokenizer(SPEC, str(tmp_path / "icl.model"))
    row = next(icl.training_sequences(SPEC, 1, seed=0))
    assert len(tokenizer.encode(row["prompt"])) == 3 * SPEC.context + 2
    assert len(tokenizer.encode(row["completion"])) == 1


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("context", 3, "even number"),
        ("bursty", 1.5, "probability"),
        ("num_symbols", 4, "symbol pairs"),
    ],
)
def test_spec_errors_name_the_bad_value(field, value, expected):
    with pytest.raises(ValueError, match=f"{field}={value}: expected .*{expected}"):
        icl.IclSpec(**{field: value})


def test_shipped_tasks_are_the_default_specs_documents():
    spec = icl.IclSpec()
    for name, docs in (
        ("icl_heldout", icl.heldout_documents(spec, 400, seed=0)),
        ("icl_inweights", icl.inweights_documents(spec, 200, seed=1)),
    ):
        path = os.path.join(REPO, "tasks", "data", f"{name}_test.jsonl")
        with open(path) as f:
            assert [json.loads(line) for line in f] == docs, name


def test_in_context_sampler_shows_a_documents_own_examples():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from fmjax.errors import RequestError
    from fmjax.inference.fewshot_samplers import InContextSampler
    from fmjax.inference.lm_eval import task_config

    manager = TaskManager(include_defaults=False, metadata={})
    loaded = manager.load(task_config("icl_heldout"))["tasks"]
    (task,) = loaded.values()
    assert isinstance(task.sampler, InContextSampler)
    doc = task.eval_docs[0]
    assert task.fewshot_context(doc, num_fewshot=0) == doc["item"]
    context = task.fewshot_context(doc, num_fewshot=4)
    shown = re.findall(r"(s\d+ s\d+) (L\d+)", context)
    assert sorted(shown) == sorted((e["item"], e["label"]) for e in doc["context"][:4])
    assert context.endswith(" " + doc["item"])
    with pytest.raises(RequestError, match="num_fewshot=9: this document has 8"):
        task.fewshot_context(doc, num_fewshot=9)


def _text_config(data_dir, tokenizer: str, jsonl: str):
    return load_config(
        "configs/gpt_lm.py:tiny",
        [
            f"--config.data.data_dir={data_dir}",
            f"--config.data.name=jsonl:{jsonl}",
            f"--config.data.tokenizer={tokenizer}",
            "--config.model.vocab_size=384",
        ],
    )


def test_a_given_tokenizer_file_is_used_as_is(tmp_path):
    tokenizer = icl.write_tokenizer(SPEC, str(tmp_path / "icl.model"))
    train = tmp_path / "train.jsonl"
    icl.write_training_file(SPEC, str(train), 50, seed=0, n_val=10)
    config = _text_config(tmp_path, str(tmp_path / "icl.model"), str(train))
    task = task_for(config)
    assert task.tokenizer.path == tokenizer.path
    batch = next(task.train_iterator())
    # Every token is a symbol, a label or a special: the file's vocabulary.
    assert np.max(batch["tokens"]) < tokenizer.vocab_size
    for bad, message in (
        (str(tmp_path / "missing.model"), "expected a SentencePiece model type"),
        (str(train), "is not a SentencePiece model"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"data.tokenizer={bad!r}")):
            task_for(_text_config(tmp_path, bad, str(train)))
        with pytest.raises(ConfigError, match=message):
            task_for(_text_config(tmp_path, bad, str(train)))
