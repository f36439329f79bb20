"""Semantic search (fmjax.inference.search): exact top-k over a corpus sharded on
the 8 simulated devices against NumPy, the index files and commands
(`fmjax embed`, `fmjax search`, `m.search`), and retrieval-augmented generation
(`fmjax generate --retrieve`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import cli
from fmjax.errors import RequestError
from fmjax.inference.commands import encoder_reference
from fmjax.inference.search import (
    Hit,
    Index,
    ShardedCorpus,
    augment,
    block_top_k,
    read_passages,
    unit_rows,
)

PASSAGES = [
    "The striker scored twice in the cup final.",
    "Shares fell sharply on Monday after the bank's results.",
    "Parliament passed the budget bill late at night.",
    "A new phone was released with a bigger screen.",
    "The cat sat on the mat in the sun.",
    "Rain is expected across the north tomorrow.",
    "The film won three awards at the festival.",
    "Engineers repaired the bridge over the river.",
    "The orchestra played Beethoven's fifth symphony.",
    "Farmers harvested wheat early this year.",
]


def _numpy_top_k(queries_QD, corpus_ND, k):
    scores_QN = queries_QD @ corpus_ND.T
    order_QK = np.argsort(-scores_QN, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores_QN, order_QK, axis=1), order_QK


@pytest.mark.parametrize(
    "count, devices, chunk",
    [
        (1003, 8, 16),
        (1003, 8, 32768),
        (37, 3, 4),
        (5, 8, 32768),
        (300, 1, 64),
        (20000, 2, 2048),  # chunks of 16 blocks: block_top_k's candidates
    ],
)
def test_sharded_top_k_equals_numpy(count, devices, chunk):
    """Rows split over `devices`, scanned `chunk` rows at a time (the last
    device's rows partly padding): the same passages, in the same order, as a
    brute-force NumPy search."""
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(count)
    corpus_ND = unit_rows(rng.standard_normal((count, 24)))
    queries_QD = unit_rows(rng.standard_normal((11, 24)))
    corpus = ShardedCorpus.place(corpus_ND, jax.devices()[:devices], chunk)
    assert len(corpus.rows_ND.sharding.device_set) == devices
    k = min(10, count)
    scores_QK, indices_QK = corpus.top_k(queries_QD, k)
    want_scores, want_indices = _numpy_top_k(queries_QD, corpus_ND, k)
    np.testing.assert_array_equal(indices_QK, want_indices)
    np.testing.assert_allclose(scores_QK, want_scores, atol=1e-6)


def test_equal_scores_go_to_the_lower_index_across_devices():
    rng = np.random.default_rng(0)
    corpus_ND = unit_rows(rng.standard_normal((64, 8)))
    corpus_ND[[9, 41, 60]] = corpus_ND[50]  # copies on devices 1, 5, 7 and 6
    corpus = ShardedCorpus.place(corpus_ND, jax.devices(), chunk=4)
    _, indices_QK = corpus.top_k(corpus_ND[[50]], 4)
    assert indices_QK[0].tolist() == [9, 41, 50, 60]


@pytest.mark.parametrize("block", [1, 4, 8])
def test_block_top_k_equals_top_k_with_ties(block):
    """Scores with many ties (small integers): the same values and indices,
    lower indices first, as lax.top_k over the whole row."""
    rng = np.random.default_rng(block)
    scores_QS = rng.integers(0, 6, size=(64, 96)).astype(np.float32)
    scores_QS[:8] = 3.0  # rows of one value
    for k in (1, 5, 12):
        got = block_top_k(jnp.asarray(scores_QS), k, block)
        want = jax.lax.top_k(jnp.asarray(scores_QS), k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_many_queries_run_in_blocks(monkeypatch):
    from fmjax.inference import search

    monkeypatch.setattr(search, "QUERY_BLOCK", 8)  # 21 queries: 8 + 8 + 5
    rng = np.random.default_rng(1)
    corpus_ND = unit_rows(rng.standard_normal((50, 8)))
    queries_QD = unit_rows(rng.standard_normal((21, 8)))
    _, indices_QK = ShardedCorpus.place(corpus_ND).top_k(queries_QD, 3)
    np.testing.assert_array_equal(indices_QK, _numpy_top_k(queries_QD, corpus_ND, 3)[1])


def test_bad_requests_name_the_value():
    corpus = ShardedCorpus.place(np.eye(4, dtype=np.float32), jax.devices()[:2])
    with pytest.raises(RequestError, match=r"k=5: expected 1 <= k <= 4"):
        corpus.top_k(np.eye(4, dtype=np.float32), 5)
    with pytest.raises(RequestError, match=r"shape \(2, 3\): expected \[Q, 4\]"):
        corpus.top_k(np.zeros((2, 3)), 1)
    with pytest.raises(RequestError, match=r"shape \(0, 4\)"):
        ShardedCorpus.place(np.zeros((0, 4)))


# --- index files and commands -------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return fmjax.load(str(tiny_bert_dir))


def test_read_passages_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first\n\nthird line\n")
    assert read_passages(str(txt)) == [
        {"id": "1", "text": "first"},
        {"id": "3", "text": "third line"},
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "a", "text": "x"}\n{"text": "y", "title": "t"}\n')
    assert read_passages(str(jsonl)) == [
        {"id": "a", "text": "x"},
        {"id": "2", "text": "y"},
    ]
    jsonl.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(RequestError, match="id 'a' appears twice"):
        read_passages(str(jsonl))
    jsonl.write_text('{"id": "a", "body": "x"}\n')
    with pytest.raises(
        RequestError, match='line 1: expected a JSON object with a "text"'
    ):
        read_passages(str(jsonl))


def test_embed_and_search_commands(encoder, tiny_bert_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "text": t}) + "\n"
            for i, t in enumerate(PASSAGES)
        )
    )
    index_dir = tmp_path / "index"
    args = ["embed", "--workdir", str(tiny_bert_dir), "--input", str(corpus)]
    assert cli.main([*args, "--output", str(index_dir), "--batch-size", "4"]) == 0
    assert "wrote an index of 10 passages x 32" in capsys.readouterr().out
    index = Index.load(str(index_dir))
    want_ND = unit_rows(encoder.embed(PASSAGES))
    np.testing.assert_allclose(index.embeddings_ND, want_ND, atol=1e-6)
    assert index.ids == [f"p{i}" for i in range(10)] and index.texts == PASSAGES

    queries = ["a football match", "stock market news"]
    argv = ["search", "--index", str(index_dir), "-k", "3", "--json"]
    assert cli.main([*argv, "--query", queries[0], "--query", queries[1]]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    _, want = _numpy_top_k(unit_rows(encoder.embed(queries)), want_ND, 3)
    for result, query, rows in zip(results, queries, want, strict=True):
        assert result["query"] == query
        assert [h["id"] for h in result["hits"]] == [f"p{i}" for i in rows]
        assert [h["text"] for h in result["hits"]] == [PASSAGES[i] for i in rows]
    # m.search: the same hits from the Python API, one list for one query.
    hits = encoder.search(queries[0], str(index_dir), k=3)
    assert [h.id for h in hits] == [h["id"] for h in results[0]["hits"]]
    assert isinstance(hits[0], Hit) and hits[0].score >= hits[1].score >= hits[2].score

    # --query-file: one query per line, or JSON per line (queries with newlines).
    multi_line = "Question: who won?\nAnswer:"
    (tmp_path / "q.txt").write_text(f"{queries[0]}\n\n{queries[1]}\n")
    (tmp_path / "q.jsonl").write_text(
        json.dumps(queries[0]) + "\n" + json.dumps({"text": multi_line}) + "\n"
    )
    for name, want_queries in (
        ("q.txt", queries),
        ("q.jsonl", [queries[0], multi_line]),
    ):
        argv_file = [*argv, "--query-file", str(tmp_path / name)]
        assert cli.main(argv_file) == 0
        got = json.loads(capsys.readouterr().out)["results"]
        assert [r["query"] for r in got] == want_queries
        assert got[0] == results[0]
    (tmp_path / "bad.jsonl").write_text('{"query": "x"}\n')
    assert cli.main([*argv, "--query-file", str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl line 1: expected a JSON string or an object with a "text"' in (
        capsys.readouterr().err
    )
    assert cli.main(argv) == 2
    assert "give --query TEXT or --query-file FILE" in capsys.readouterr().err

    assert (
        cli.main(["search", "--index", str(index_dir), "--query", "rain", "-k", "2"])
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("query: rain\n  1. ") and text.count("\n") == 3


def test_index_records_its_encoder_so_search_runs_anywhere(tmp_path, monkeypatch):
    """A relative directory becomes absolute; the package model's name and a
    remote path stay as given (the name was made a path under the current
    directory, so `fmjax search` failed after `embed --workdir all-MiniLM-L6-v2`)."""
    monkeypatch.chdir(tmp_path)
    assert encoder_reference("runs/enc") == str(tmp_path / "runs" / "enc")
    assert encoder_reference("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert encoder_reference("gs://bucket/enc") == "gs://bucket/enc"


def test_embed_npy_and_missing_index(encoder, tiny_bert_dir, tmp_path, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(PASSAGES[:3]) + "\n")
    out = tmp_path / "emb.npy"
    args = ["embed", "--workdir", str(tiny_bert_dir), "--input", str(lines)]
    assert cli.main([*args, "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), encoder.embed(PASSAGES[:3]), atol=1e-6)
    assert cli.main(["search", "--index", str(tmp_path), "--query", "x"]) == 2
    assert "is not an index (no index.json)" in capsys.readouterr().err


def test_augment_puts_passages_first():
    hits = [Hit("a", "Ada lives in Oslo.", 0.9), Hit("b", "Bo lives in Rome.", 0.5)]
    assert augment("Q: Where does Ada live?\nA:", hits) == (
        "Ada lives in Oslo.\nBo lives in Rome.\n\nQ: Where does Ada live?\nA:"
    )
    assert augment("Q?", hits[:1], "Context: {passages}\n{prompt}") == (
        "Context: Ada lives in Oslo.\nQ?"
    )
    with pytest.raises(
        RequestError, match=r"expected both \{passages\} and \{prompt\}"
    ):
        augment("Q?", hits, "{passages} only")


def test_bench_search_finds_what_faiss_finds(capsys):
    pytest.importorskip("faiss")
    argv = ["bench", "search", "--count", "3000", "--dim", "16", "--queries", "40"]
    assert cli.main([*argv, "-k", "5", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["corpus"] == [3000, 16] and result["queries"] == 40
    assert result["identical_queries"] == 1.0 and result["differing_ranks"] == 0
    assert result["max_score_difference"] <= 1e-6
    want = result["fmjax"]["queries_per_s"] / result["faiss"]["queries_per_s"]
    assert result["speedup_vs_faiss"] == pytest.approx(want)


def test_prompt_and_query_files_read_the_same_way(tmp_path):
    """generate's --prompt-file and search's --query-file: lines, or JSON lines
    (a "prompt" field; queries also bare strings); errors name the file line."""
    from fmjax.errors import RequestError
    from fmjax.inference.commands import read_texts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a\\nb"}\n\n{"text": "c"}\n')
    with pytest.raises(
        RequestError, match='p.jsonl line 3: expected a JSON object with a "prompt"'
    ):
        read_texts(str(path), "prompt")
    path.write_text('{"prompt": "a\\nb"}\n\n{"prompt": "c"}\n')
    assert read_texts(str(path), "prompt") == ["a\nb", "c"]
    (tmp_path / "q.txt").write_text("one\n\ntwo\n")
    assert read_texts(str(tmp_path / "q.txt"), "text", strings=True) == ["one", "two"]
