"""The prompting toolkit (fmjax.inference.prompting): templates, few-shot
examples (first-n, seeded random, nearest by an encoder) from Python and as
lm-eval's "similar" sampler, chain-of-thought prompts against the contexts
lm-eval builds for the shipped tasks, and answer extraction against lm-eval's
own regex filter."""

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.samplers import (  # noqa: E402
    SAMPLER_REGISTRY,
    ContextSampler,
    FirstNSampler,
)
from lm_eval.filters.extraction import RegexFilter  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from test_gpt2 import exported, fm, hf_gpt2  # noqa: E402, F401

from fmjax.errors import RequestError  # noqa: E402
from fmjax.inference import prompting  # noqa: E402
from fmjax.inference.fewshot_samplers import (  # noqa: E402
    SimilarSampler,
    bind_similar_sampler,
)
from fmjax.inference.lm_eval import (  # noqa: E402
    TASKS_DIR,
    FmjaxLM,
    evaluate,
    task_config,
)
from fmjax.inference.prompting import (  # noqa: E402
    choose_examples,
    extract_answer,
    few_shot_prompt,
    fill_template,
    first_examples,
    flexible_answer,
    random_examples,
    similar_examples,
    strict_answer,
    text_embedder,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
BBC_TOPICS = [" business", " entertainment", " politics", " sport", " technology"]


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_defaults=False, metadata={})  # fmjax's YAMLs only


def _task(manager, spec):
    (task,) = manager.load(task_config(spec))["tasks"].values()
    return task


def _cosine_order(vectors_ND, query_D):
    """NumPy reference: pool indices by cosine similarity, the nearest first."""
    unit_ND = vectors_ND / np.linalg.norm(vectors_ND, axis=1, keepdims=True)
    similarity_N = unit_ND @ (query_D / np.linalg.norm(query_D))
    return list(np.argsort(-similarity_N, kind="stable"))


# --- templates --------------------------------------------------------------------


def test_templates_are_the_shipped_tasks_prompts_and_errors_name_the_problem():
    question = {"question": "What is 2 + 3?", "answer": "5"}  # answer: unused
    assert fill_template("plain", question) == "Question: What is 2 + 3?\nAnswer:"
    assert (
        fill_template("instruction", question, instruction="Add the numbers.")
        == "Add the numbers.\n\nQuestion: What is 2 + 3?\nAnswer:"
    )
    assert fill_template("Review: {text}\nSentiment:", text="Dull.") == (
        "Review: Dull.\nSentiment:"
    )
    # "plain" and "cot" are arithmetic's and arithmetic_cot's doc_to_text.
    for name, task in (("plain", "arithmetic"), ("cot", "arithmetic_cot")):
        yaml = load_yaml(os.path.join(TASKS_DIR, f"{task}.yaml"))
        jinja = yaml["doc_to_text"].replace("{{question}}", "{question}")
        assert prompting.TEMPLATES[name] == jinja, name
    assert prompting.TEMPLATES["cot"].endswith("Let's think step by step.")

    with pytest.raises(RequestError, match=r"'plian'.*'cot', 'instruction', 'plain'"):
        fill_template("plian", question)
    with pytest.raises(RequestError, match=r"\['instruction'\].*'question'"):
        fill_template("instruction", question)
    with pytest.raises(RequestError, match="named fields"):
        fill_template("Question: {0}", question)


# --- choosing examples ------------------------------------------------------------


def test_first_n_keeps_pool_order_and_random_is_seeded():
    assert first_examples(POOL, 3) == POOL[:3]
    assert choose_examples(POOL, 3, "first_n") == FirstNSampler(POOL).sample(3)

    draws = {seed: random_examples(POOL, 4, seed) for seed in range(5)}
    for seed, draw in draws.items():
        assert random_examples(POOL, 4, seed) == draw  # reproducible
        assert choose_examples(POOL, 4, "random", seed=seed) == draw
        assert len({e["question"] for e in draw}) == 4  # without replacement
        # lm-eval's default sampler seeded so makes the same first draw.
        assert ContextSampler(POOL, rnd=seed).sample(4) == draw
    assert len({json.dumps(d) for d in draws.values()}) == 5  # seeds differ
    assert random_examples(POOL, 4, 0) != POOL[:4]

    with pytest.raises(RequestError, match="k=21: expected an int from 0 to .* 20"):
        first_examples(POOL, 21)
    with pytest.raises(RequestError, match="how='nearest'"):
        choose_examples(POOL, 2, "nearest")
    with pytest.raises(RequestError, match="give query="):
        choose_examples(POOL, 2, "similar")


SENTENCES = {
    "football": [
        "The striker scored twice as United won the football match.",
        "The goalkeeper saved a penalty in the second half of the game.",
    ],
    "cooking": [
        "Simmer the onions in butter before adding the flour.",
        "Bake the bread for forty minutes in a hot oven.",
    ],
    "markets": [
        "Shares fell sharply on the stock exchange after the profit warning.",
        "The central bank raised interest rates to curb inflation.",
    ],
    "astronomy": [
        "The telescope observed a distant galaxy and its black hole.",
        "Astronomers found a new planet orbiting a nearby star.",
    ],
}


def test_similar_examples_are_the_nearest_by_cosine_nearest_last(minilm_dir):
    pool = [
        {"text": text, "topic": topic}
        for topic, texts in SENTENCES.items()
        for text in texts
    ]
    query = "Who scored the winning goal in the cup final?"
    shots = similar_examples(pool, query, 2, encoder=minilm_dir, text="text")
    # The two football sentences, whatever the encoder's numbers.
    assert {s["topic"] for s in shots} == {"football"}
    # In the order NumPy's cosine gives on the encoder's own embeddings.
    model = text_embedder(minilm_dir).encoder
    vectors_ND = model.embed([p["text"] for p in pool])
    order = _cosine_order(vectors_ND, model.embed([query])[0])
    assert shots == [pool[order[1]], pool[order[0]]]  # the nearest last
    # A row query embeds its `text` field; a text in the pool is its own nearest.
    kitchen = {"text": SENTENCES["cooking"][1]}
    shots = choose_examples(
        pool, 3, "similar", query=kitchen, encoder=model, text="text"
    )
    assert shots[-1]["text"] == kitchen["text"] and shots[-2]["topic"] == "cooking"
    assert text_embedder(model) is text_embedder(model)  # one cache per model

    with pytest.raises(RequestError, match="text='question'.*'text', 'topic'"):
        similar_examples(pool, query, 2, encoder=model)
    with pytest.raises(RequestError, match="'/no/such/encoder' is not a directory"):
        similar_examples(pool, query, 2, encoder="/no/such/encoder", text="text")


# --- the lm-eval sampler ----------------------------------------------------------


def test_similar_sampler_is_registered_and_refuses_to_run_unbound(manager):
    assert SAMPLER_REGISTRY["similar"] is SimilarSampler
    task = _task(manager, "bbc_topic_similar")
    assert isinstance(task.sampler, SimilarSampler)
    with pytest.raises(RequestError, match="bind_similar_sampler"):
        task.fewshot_context(task.eval_docs[0], num_fewshot=2)
    with pytest.raises(RequestError, match="sampler: similar"):
        bind_similar_sampler(_task(manager, "bbc_topic"), "unused")


SELF_POOL_YAML = """\
task: self_pool
dataset_path: json
dataset_kwargs:
  data_files:
    test: rows.jsonl
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Article: {{text}}\\nTopic:"
doc_to_choice: [" business", " entertainment", " politics", " sport", " technology"]
doc_to_target: label
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
fewshot_config:
  sampler: similar
metric_list:
  - metric: acc
"""


def test_similar_sampler_leaves_out_the_query_when_pools_share_a_split(
    manager, minilm_dir, tmp_path
):
    """Few-shot split = test split: lm-eval passes the query as eval_doc; its
    identical row is the nearest yet no example of itself."""
    texts = [text for texts in SENTENCES.values() for text in texts]
    rows = [{"text": text, "label": i % 5} for i, text in enumerate(texts)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "self_pool.yaml").write_text(SELF_POOL_YAML)
    task = _task(manager, str(tmp_path / "self_pool.yaml"))
    assert task.fewshot_cfg.split == task.config.test_split == "test"
    bind_similar_sampler(task, minilm_dir, task.eval_docs)
    context = task.fewshot_context(task.eval_docs[0], num_fewshot=1)
    # Its one example: the other football sentence, not itself.
    assert context == (
        f"Article: {rows[1]['text']}\nTopic:{BBC_TOPICS[1]}\n\n"
        f"Article: {rows[0]['text']}\nTopic:"
    )


def test_evaluate_with_the_similar_sampler_prompts_the_nearest_examples(
    fm,  # noqa: F811
    minilm_dir,
    manager,
):
    """bbc_topic_similar through evaluate() (the default encoder, MiniLM):
    each logged context is exactly few_shot_prompt of the two training articles
    NumPy's cosine ranks nearest, the nearest last."""
    lm = FmjaxLM(fm, batch_size=8, progress=False)
    out = evaluate(lm, ["bbc_topic_similar"], num_fewshot=2, limit=3, log_samples=True)
    assert out["results"]["bbc_topic_similar"]["sample_len"] == 3
    assert 0 <= out["results"]["bbc_topic_similar"]["acc,none"] <= 1

    train = list(_task(manager, "bbc_topic").fewshot_docs())
    examples = [{**d, "topic": BBC_TOPICS[d["label"]]} for d in train]
    template = "Article: {text}\nTopic:"
    model = text_embedder(minilm_dir).encoder
    # Embedded in the batches the sampler used: the pool, then the 3 queries.
    train_ND = model.embed([fill_template(template, d) for d in train])
    samples = out["samples"]["bbc_topic_similar"]
    queries_QD = model.embed([fill_template(template, s["doc"]) for s in samples])
    chosen = []
    for sample, query_D in zip(samples, queries_QD, strict=True):
        doc = sample["doc"]
        order = _cosine_order(train_ND, query_D)
        nearest = [examples[order[1]], examples[order[0]]]
        want = few_shot_prompt(
            nearest, doc, template, target="topic", target_delimiter=""
        )
        contexts = {args[0] for args in sample["arguments"]}
        assert contexts == {want}
        chosen.append((order[0], order[1]))
    assert len(set(chosen)) == 3  # each article has its own examples


# --- chain of thought ---------------------------------------------------------------


def test_few_shot_prompts_are_the_contexts_lm_eval_builds(manager):
    """arithmetic_cot's scratchpad exemplars (first_n) and arithmetic's seeded
    random examples, as few_shot_prompt lays them out."""
    cot = _task(manager, "arithmetic_cot")
    train = list(cot.fewshot_docs())
    assert "Let's think step by step" not in train[0]["scratchpad"]
    for doc in list(cot.eval_docs)[:3]:
        assert cot.fewshot_context(doc, num_fewshot=0) == fill_template("cot", doc)
        want = few_shot_prompt(
            first_examples(train, 3), doc, template="cot", target="scratchpad"
        )
        assert cot.fewshot_context(doc, num_fewshot=3) == want
    plain = _task(manager, "arithmetic")
    plain.set_fewshot_seed(7)
    doc = plain.eval_docs[0]
    want = few_shot_prompt(random_examples(train, 2, seed=7), doc)
    assert plain.fewshot_context(doc, num_fewshot=2) == want


GENERATIONS = [
    "The answer is 42.",
    " 7 + 5 = 12, write 2 carry 1. Write the carry 1. The answer is 12.\n",
    "The answer is -17. Wait: The answer is 5.",
    "I think it is 12, or maybe 13",
    "no digits here",
    "",
    "The answer is  7",  # two spaces: not strict
    "the answer is 8",  # lower case: not strict
    "-5 and - 6",
    "3.14 is not 3",
    "x = 9\n\nQuestion: What is 1 + 1?",
    "The answer is 0012",
    None,  # lm-eval reads a non-string response as ""
]


def test_answer_extraction_equals_lm_evals_regex_filter():
    """strict_answer / flexible_answer against RegexFilter built from
    arithmetic_cot.yaml's own filter_list, and extract_answer with several
    groups, a custom fallback and each group_select."""
    yaml = load_yaml(os.path.join(TASKS_DIR, "arithmetic_cot.yaml"))
    filters = {f["name"]: f["filter"][0] for f in yaml["filter_list"]}
    ours = {"strict-match": strict_answer, "flexible-extract": flexible_answer}
    for name, read in ours.items():
        kwargs = {k: v for k, v in filters[name].items() if k != "function"}
        assert filters[name]["function"] == "regex"
        theirs = RegexFilter(**kwargs).apply([[g] for g in GENERATIONS], None)
        assert [read(g) for g in GENERATIONS] == [t[0] for t in theirs], name
    assert strict_answer(GENERATIONS[2]) == "-17"
    assert flexible_answer(GENERATIONS[2]) == "5"
    assert strict_answer(GENERATIONS[4]) == "[invalid]"

    pattern = r"answer is (-?\d+)|= *(\d+)|(zzz)|(q?)END"
    for group_select in (0, -1):
        kwargs = dict(regex_pattern=pattern, group_select=group_select, fallback=" ?")
        generations = [*GENERATIONS, "answer is 3 and x = 4", "zzz = 5", "the END"]
        theirs = RegexFilter(**kwargs).apply([[g] for g in generations], None)
        ours = [extract_answer(g, **kwargs) for g in generations]
        assert ours == [t[0] for t in theirs], group_select
    assert extract_answer("answer is 3 and x = 4", pattern, -1) == "4"
    with pytest.raises(RequestError, match="group_select=2 of 1 matches"):
        extract_answer("The answer is 1", prompting.STRICT_PATTERN, group_select=2)


# --- docs ---------------------------------------------------------------------------


def test_the_docs_example_prints_what_the_docs_say(minilm_dir, monkeypatch, capsys):
    text = open(os.path.join(REPO, "docs", "prompting.md"), encoding="utf-8").read()
    example = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    printed = re.search(r"```text\n(.*?)```", example, re.S).group(1)
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/prompting.md", "exec"), {})
    assert capsys.readouterr().out == printed
