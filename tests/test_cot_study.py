"""bench/cot_study.py's data: answer formats and the lm-eval tasks it writes
(the training runs themselves are the study, not a test)."""

import json
import os
import re
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import cot_study  # noqa: E402


@pytest.mark.parametrize("a, b", [(0, 0), (7, 5), (123, 178), (999, 1), (58, 4071)])
def test_scratchpad_columns_add_up_to_the_sum(a, b):
    text = cot_study.scratchpad(a, b)
    steps, answer = text.split(" =")
    assert int(answer) == a + b
    carry, digits = 0, []
    for step in steps.split(","):
        x, y, c, total = map(
            int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", step).groups()
        )
        assert c == carry and total == x + y + c
        digits.append(total % 10)
        carry = total // 10
    written = "".join(map(str, digits[::-1]))
    assert int(f"{carry}{written}" if carry else written) == a + b


def test_formats_answers_and_the_regex_that_reads_them():
    for kind in cot_study.FORMATS:
        completion = cot_study.completion(kind, 123, 178)
        match = re.search(cot_study.ANSWER_PATTERNS[kind], " " + completion)
        assert match.group(1) == cot_study.target(kind, 123, 178)
    assert cot_study.target("reversed", 123, 178) == "103"


def test_written_tasks_load_and_keep_test_problems_out_of_training(tmp_path):
    pytest.importorskip("lm_eval")
    from fmjax.inference.lm_eval import task_config

    files = cot_study.write_data(str(tmp_path), 2, 300, 20)
    train_path, yamls = files["scratchpad"]
    train = [json.loads(line) for line in open(train_path)]
    seen = {row["prompt"] for row in train}
    assert {"train", "validation"} == {row["split"] for row in train}
    for name, yaml in yamls.items():
        config = task_config(yaml)
        test = config["dataset_kwargs"]["data_files"]["test"]
        docs = [json.loads(line) for line in open(test)]
        assert len(docs) == 20 and not seen & {d["prompt"] for d in docs}
        lengths = {len(d["prompt"].split("+")[0]) for d in docs}
        assert lengths == ({1, 2} if name == "1-2" else {int(name)})


def test_prompted_rows_and_prompts_have_the_same_shape(tmp_path):
    """The prompted model trains on PROMPT_SHOTS solved problems then a query,
    one format per row; lm-eval prompts it the same way, the exemplars in the
    format the task names."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from fmjax.inference.lm_eval import task_config

    files = cot_study.write_data(str(tmp_path), 2, 300, 20)
    train_path, yamls = files["prompted"]
    rows = [json.loads(line) for line in open(train_path)]
    styles = set()
    for row in rows:
        *solved, query = row["prompt"].split("\n")
        assert len(solved) == cot_study.PROMPT_SHOTS and query.endswith("=")
        a, b = map(int, query[:-1].split("+"))
        style = "scratchpad" if " =" in row["completion"] else "direct"
        assert row["completion"] == cot_study.completion(style, a, b)
        for line in solved:  # every example in the row's own format
            x, y = map(int, line.split("=", 1)[0].split("+"))
            assert line == f"{x}+{y}={cot_study.completion(style, x, y)}"
        styles.add(style)
    assert styles == set(cot_study.PROMPTING)
    manager = TaskManager(include_defaults=False, metadata={})
    for style in cot_study.PROMPTING:
        (task,) = manager.load(task_config(yamls[f"{style}:3"]))["tasks"].values()
        doc = task.eval_docs[0]
        context = task.fewshot_context(doc, num_fewshot=cot_study.PROMPT_SHOTS)
        *solved, query = context.split("\n")
        assert query == doc["prompt"] and len(solved) == cot_study.PROMPT_SHOTS
        for line in solved:
            x, y = map(int, line.split("=", 1)[0].split("+"))
            assert line == f"{x}+{y}={cot_study.completion(style, x, y)}"
