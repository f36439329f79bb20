"""bench/rag_study.py's data: made-up facts, training rows in the layout
retrieval gives, test people never trained on (the runs are the study)."""

import json
import os
import sys

import pytest
from conftest import REPO

from fmjax.inference.search import Hit, augment

sys.path.insert(0, os.path.join(REPO, "bench"))
import rag_study  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return rag_study.write_data(str(tmp_path_factory.mktemp("rag")), 60, 300, 20)


def test_rows_answer_from_a_shown_passage_in_the_retrieval_layout(files):
    test = [json.loads(line) for line in open(files["test"])]
    rows = [json.loads(line) for line in open(files["train"])]
    corpus = {p["id"]: p["text"] for p in map(json.loads, open(files["corpus"]))}
    assert len(corpus) == 80 and all(d["passage"] == corpus[d["name"]] for d in test)
    test_names = {d["name"] for d in test}
    shown_counts = set()
    for row in rows:
        passages, question = row["prompt"].split("\n\n")
        passages = passages.split("\n")
        shown_counts.add(len(passages))
        names = [p.split(" was born")[0] for p in passages]
        (name,) = [n for n in names if f" {n} " in question]  # the one asked about
        gold = passages[names.index(name)]
        assert row["completion"].strip() in gold and name not in test_names
        # Retrieval puts the same passages in front the same way.
        hits = [Hit(str(i), p, 0.0) for i, p in enumerate(passages)]
        assert augment(question, hits) == row["prompt"]
    assert shown_counts == set(range(1, rag_study.MAX_PASSAGES + 1))


def test_tasks_ask_the_question_alone_or_after_the_gold_passage(files):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from fmjax.inference.lm_eval import task_config

    manager = TaskManager(include_defaults=False, metadata={})
    (closed,) = manager.load(task_config(files["closed"]))["tasks"].values()
    (gold,) = manager.load(task_config(files["gold"]))["tasks"].values()
    doc = closed.eval_docs[0]
    assert closed.fewshot_context(doc, num_fewshot=0) == doc["question"]
    assert gold.fewshot_context(doc, num_fewshot=0) == (
        f"{doc['passage']}\n\n{doc['question']}"
    )
    assert doc["answer"] in doc["passage"]
    # Gold first, then random training people, in the retrieval layout.
    train_names = {
        json.loads(r)["prompt"].split(" was born")[0] for r in open(files["train"])
    }
    for count in rag_study.DISTRACTORS:
        (task,) = manager.load(task_config(files[f"gold_and_{count}_random"]))[
            "tasks"
        ].values()
        context = task.fewshot_context(doc, num_fewshot=0)
        passages, question = context.split("\n\n")
        passages = passages.split("\n")
        assert question == doc["question"] and passages[0] == doc["passage"]
        assert len(passages) == 1 + count
        assert all(p.split(" was born")[0] in train_names for p in passages[1:])
