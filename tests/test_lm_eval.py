"""fmjax decoders in lm-evaluation-harness (fmjax.inference.lm_eval), against
lm-eval's own `hf` model on the same weights: the seeded random GPT-2 of
tests/test_gpt2.py, converted with `fmjax convert hf-to-fmjax`."""

import json
import os
import random

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from test_gpt2 import exported, fm, hf_gpt2  # noqa: E402, F401

from fmjax import bench_eval, cli  # noqa: E402
from fmjax.errors import RequestError  # noqa: E402
from fmjax.inference.lm_eval import (  # noqa: E402
    TASKS_DIR,
    FmjaxLM,
    evaluate,
    task_config,
)

MAX_LENGTH = 48  # short, so long requests are cut and rolling windows roll

PAIRS = [
    ("The model reads", " packed batches of tokens"),
    ("Hello, world! ", "Hello again."),  # a trailing space moves to the continuation
    ("", "An empty context is the prefix token."),
    ("Café naïve Zürich:", " Ångström's résumé."),
    ("It costs $1,234.56", " (about 12%)"),
    # Longer than MAX_LENGTH with its continuation: cut from the left, as hf.
    (" ".join(["the checkpoint"] * 30), " writes a checkpoint"),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Sentiment:", " positive"),
]


def _requests(kind, args_list):
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=i)
        for i, args in enumerate(args_list)
    ]


def _hflm(hf_gpt2, bos: bool):  # noqa: F811
    """lm-eval's `hf` model on the HF GPT-2 (as `fmjax bench eval` builds it);
    `bos`: its tokenizer puts <|endoftext|> first, as fmjax's contexts have it."""
    return bench_eval.hf_lm(hf_gpt2[0], batch_size=4, max_length=MAX_LENGTH, bos=bos)


@pytest.fixture(scope="module")
def hf_lm(hf_gpt2):  # noqa: F811
    return _hflm(hf_gpt2, bos=True)


@pytest.fixture(scope="module")
def lm(fm):  # noqa: F811
    return FmjaxLM(fm, batch_size=8, max_length=MAX_LENGTH, progress=False)


def test_loglikelihood_equals_hf_per_request(lm, hf_lm):
    ours = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    theirs = hf_lm.loglikelihood(_requests("loglikelihood", PAIRS))
    for pair, (a, greedy_a), (b, greedy_b) in zip(PAIRS, ours, theirs, strict=True):
        assert abs(a - b) <= 1e-4, (pair, a, b)
        assert greedy_a == greedy_b, pair
    # Some continuation is the greedy one: is_greedy is not always False.
    context, token = _greedy_pair(lm)
    greedy = lm.loglikelihood(_requests("loglikelihood", [(context, token)]))
    assert greedy[0][1]


def _greedy_pair(lm):
    """(context, its greedy next token as text), for the first context whose
    greedy token is whole text: one that decodes and encodes back to itself
    after the context (a lone byte of a multi-byte character does not). The
    tokenizer is trained on the docs, so which context that is can change."""
    for context in ("The model", "The", "In the", "It is", "A"):
        ids = lm.tok_encode(context)
        token = int(lm.model.logits(np.asarray([ids], np.int32))[0, -1].argmax())
        text = lm.tok_decode([token])
        if lm.tok_encode(context + text) == [*ids, token]:
            return context, text
    raise AssertionError("no context's greedy token is whole text")


def test_scores_do_not_depend_on_batch_size_or_order(fm):  # noqa: F811
    pairs = PAIRS * 2
    one = FmjaxLM(fm, batch_size=1, max_length=MAX_LENGTH, progress=False)
    eight = FmjaxLM(fm, batch_size=8, max_length=MAX_LENGTH, progress=False)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    by_one = one.loglikelihood(_requests("loglikelihood", pairs))
    shuffled = eight.loglikelihood(
        _requests("loglikelihood", [pairs[i] for i in order])
    )
    by_eight = [None] * len(pairs)
    for position, i in enumerate(order):
        by_eight[i] = shuffled[position]
    for pair, (a, greedy_a), (b, greedy_b) in zip(pairs, by_one, by_eight, strict=True):
        # Other widths, other float rounding; nothing else.
        assert abs(a - b) <= 1e-5, (pair, a, b)
        assert greedy_a == greedy_b, pair


def test_rolling_loglikelihood_equals_hf(lm, hf_gpt2):  # noqa: F811
    """A text's tokens after the prefix token, in lm-eval's windows (hf scores
    a BOS its tokenizer adds as part of the text: compared without one)."""
    hf_lm = _hflm(hf_gpt2, bos=False)
    texts = [
        "Short text.",
        " ".join(["The model reads packed batches of tokens."] * 20),  # 3+ windows
    ]
    ours = lm.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(t,) for t in texts])
    )
    theirs = hf_lm.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(t,) for t in texts])
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-5)
    # The long text is longer than one window: its windows all counted.
    assert len(lm.tok_encode(texts[1], add_special_tokens=False)) > 2 * MAX_LENGTH


def test_generate_until_equals_hf_greedy(lm, hf_lm):
    args = [
        ("The model reads", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
        ("Hello, world!", {"until": ["\n", ","], "max_gen_toks": 12}),
        ("It costs", {"until": "s", "max_gen_toks": 8}),
    ]
    ours = lm.generate_until(_requests("generate_until", args))
    theirs = hf_lm.generate_until(_requests("generate_until", args))
    assert ours == theirs
    for (_, kwargs), text in zip(args, ours, strict=True):
        until = (
            kwargs["until"] if isinstance(kwargs["until"], list) else [kwargs["until"]]
        )
        assert not any(u in text for u in until), text


def test_shipped_task_scores_equal_lm_evals_hf_model(lm, hf_lm):
    """acc and acc_norm of rt_sentiment (2-shot, 24 reviews), and exact match on
    arithmetic, as lm-eval computes them with its own `hf` model."""
    tasks = ["rt_sentiment", "arithmetic"]
    ours = evaluate(lm, tasks, num_fewshot=2, limit=24)["results"]
    theirs = evaluate(hf_lm, tasks, num_fewshot=2, limit=24)["results"]
    for task, metrics in (
        ("rt_sentiment", ("acc,none", "acc_norm,none")),
        ("arithmetic", ("exact_match,strict-match", "exact_match,flexible-extract")),
    ):
        for metric in metrics:
            assert ours[task][metric] == theirs[task][metric], (task, metric)
        assert ours[task]["sample_len"] == 24


def test_eval_command_writes_a_table_over_k(exported, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lm_eval"
    argv = ["eval", "--workdir", exported, "--tasks", "rt_sentiment,bbc_topic"]
    argv += ["--num-fewshot", "0,1", "--limit", "4", "--output", str(out)]
    assert cli.main(argv + ["--plot", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = printed["table"]
    assert [row["task"] for row in table] == ["rt_sentiment", "bbc_topic"]
    for row in table:
        assert row["metric"] == "acc,none"
        assert 0 <= row["0"] <= 1 and 0 <= row["1"] <= 1
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved) == ["0", "1"]
    assert saved["1"]["n-shot"]["rt_sentiment"] == 1
    assert "| rt_sentiment | acc,none |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_shots.png").stat().st_size > 0


def test_a_task_yaml_of_ones_own_reads_data_beside_it(fm, tmp_path):  # noqa: F811
    rows = [{"q": f"{a} plus {a}", "a": str(2 * a)} for a in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "double.yaml").write_text(
        "task: double\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{q}} is"\ndoc_to_target: " {{a}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    lm = FmjaxLM(fm, batch_size=4, progress=False)
    os.chdir(tmp_path.parent)  # data_files are read beside the YAML, not here
    results = evaluate(lm, [str(tmp_path / "double.yaml")])["results"]["double"]
    assert results["sample_len"] == 6 and results["perplexity,none"] > 1


def test_an_included_task_reads_its_data_beside_the_included_yaml(tmp_path):
    """A variant YAML in another folder `include`s a shipped task: the data
    files stay relative to the shipped YAML, which declares them."""
    shipped = task_config("rt_sentiment")
    sub = tmp_path / "variants"
    sub.mkdir()
    (sub / "rt_first_n.yaml").write_text(
        f"include: {os.path.relpath(TASKS_DIR, sub)}/rt_sentiment.yaml\n"
        "task: rt_first_n\nfewshot_config:\n  sampler: first_n\n"
    )
    variant = task_config(str(sub / "rt_first_n.yaml"))
    assert variant["task"] == "rt_first_n"
    assert variant["fewshot_config"]["sampler"] == "first_n"
    files = variant["dataset_kwargs"]["data_files"]
    assert files == shipped["dataset_kwargs"]["data_files"]
    assert files["test"] == os.path.join(TASKS_DIR, "data/rotten_tomatoes_test.jsonl")


def test_bad_requests_name_the_value(fm, tmp_path, capsys):  # noqa: F811
    with pytest.raises(RequestError, match="batch_size=0"):
        FmjaxLM(fm, batch_size=0)
    with pytest.raises(RequestError, match="does not exist"):
        task_config(str(tmp_path / "missing.yaml"))
    lm = FmjaxLM(fm, batch_size=2, max_length=16, progress=False)
    with pytest.raises(RequestError, match="max_gen_toks=32"):
        lm.generate_until(_requests("generate_until", [("Hi", {"max_gen_toks": 32})]))
    code = cli.main(
        ["eval", "--workdir", "x", "--tasks", "rt_sentiment", "--num-fewshot", "a"]
    )
    assert code != 0
    assert "--num-fewshot 'a'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def facts_index(tiny_bert_dir, tmp_path_factory):
    """`fmjax embed` of three facts with the tiny BERT: the index directory."""
    folder = tmp_path_factory.mktemp("facts")
    facts = ["Ada lives in Oslo.", "Bo plays the violin.", "Cy was born in 1970."]
    lines = folder / "facts.txt"
    lines.write_text("\n".join(facts) + "\n")
    index_dir = str(folder / "index")
    embed = ["embed", "--workdir", str(tiny_bert_dir), "--input", str(lines)]
    assert cli.main([*embed, "--output", index_dir]) == 0
    return index_dir


def test_generate_retrieve_sends_the_top_passages_first(
    fm,  # noqa: F811
    exported,  # noqa: F811
    facts_index,
    capsys,
):
    """`fmjax generate --retrieve INDEX -k 2`: the prompt sent is the two passages
    `fmjax search` ranks first, a blank line, then the prompt; --show-prompt
    prints it and the completion is the decoder's own on that prompt."""
    from fmjax.inference.search import Index

    prompt = "Question: where does Ada live?\nAnswer:"
    hits = Index.load(facts_index).search_texts(prompt, 2)
    sent = f"{hits[0].text}\n{hits[1].text}\n\n{prompt}"
    capsys.readouterr()
    argv = ["generate", "--workdir", exported, "--prompt", prompt, "--max-new-tokens"]
    argv += ["4", "--retrieve", facts_index, "-k", "2", "--show-prompt", "--json"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- prompt sent to the model ---\n{sent}\n---\n")
    record = json.loads(out.splitlines()[-1])["completions"][0]
    assert record["prompt"] == prompt and record["prompt_sent"] == sent
    assert [p["id"] for p in record["passages"]] == [h.id for h in hits]
    assert record["completion"] == fm.generate([sent], max_new_tokens=4)[0]


def test_eval_retrieve_puts_the_nearest_passages_before_each_context(
    fm,  # noqa: F811
    exported,  # noqa: F811
    facts_index,
    tmp_path,
    capsys,
):
    """`evaluate(retrieve=...)` (`fmjax eval --retrieve INDEX -k 2`): every
    logged context is the two passages `Index.search_texts` finds for the
    document's question, a blank line, then the context lm-eval built."""
    from fmjax.inference.search import Index, augment

    lm = FmjaxLM(fm, batch_size=4, progress=False)
    retrieve = {"index": facts_index, "k": 2}
    out = evaluate(lm, ["rt_sentiment"], 0, 3, retrieve=retrieve, log_samples=True)
    plain = evaluate(lm, ["rt_sentiment"], 0, 3, log_samples=True)
    index = Index.load(facts_index)
    for doc, bare in zip(
        out["samples"]["rt_sentiment"], plain["samples"]["rt_sentiment"], strict=True
    ):
        question = f"Review: {doc['doc']['text']}\nSentiment:"
        want = augment(bare["arguments"][0][0], index.search_texts(question, 2))
        assert doc["arguments"][0][0] == want and want.startswith(
            index.search_texts(question, 2)[0].text
        )
    argv = ["eval", "--workdir", exported, "--tasks", "rt_sentiment", "--limit", "2"]
    argv += ["--retrieve", facts_index, "-k", "1", "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 0
    assert "rt_sentiment" in capsys.readouterr().out


def test_tree_work_counts_each_prefix_once():
    """`fmjax bench eval`'s least work: shared prefixes once, keys read per
    node, scored nodes deduplicated."""
    inputs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6], [1, 2, 3, 4]]
    counts = [1, 1, 2, 1]
    work = bench_eval.tree_work(inputs, counts)
    # nodes: 1, 2, 3, 4, 5, 6 (the repeated input adds none)
    assert work["tokens"] == 6
    assert work["attended"] == 1 + 2 + 3 + 4 + 4 + 3
    # scored: node 4, node 5, nodes 2 and 6 (the repeat scores node 4 again)
    assert work["scored"] == 4


def test_necessary_flops_of_a_gpt2_shape():
    import types

    cfg = types.SimpleNamespace(
        num_layers=2, d_model=8, head_dim=4, num_heads=2, kv_heads=2,
        mlp_dim=32, vocab_size=100,
    )  # fmt: skip
    weights = 2 * (8 * 4 * 8 + 2 * 8 * 32)  # q, k, v, o and the MLP, per layer
    flops = bench_eval.necessary_flops(cfg, tokens=10, attended=30, scored=3)
    assert flops == 2 * weights * 10 + 4 * 2 * 2 * 4 * 30 + 2 * 8 * 100 * 3
