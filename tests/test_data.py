"""fmjax.data: TFDS sources, SentencePiece, grain packing pipelines."""

import collections
import json
import os
import re

import numpy as np
import pytest

from fmjax.data import sources, text
from fmjax.data import tokenizer as tokenizer_lib

VOCAB = 1000
SEQ_LEN = 64
BATCH = 4
BBC_SIZE = 2225


# `data_dir` (conftest.py): bbc_news prepared, with a 1000-token tokenizer cached.


@pytest.fixture(scope="session")
def tok(data_dir):
    # Loads the tokenizer conftest.py trained (or trains it if VOCAB differs).
    return tokenizer_lib.tokenizer_for("bbc_news", VOCAB, data_dir)


@pytest.fixture(scope="session")
def train_source(data_dir):
    return sources.load_source("bbc_news", "train", data_dir)


@pytest.fixture(scope="session")
def valid_source(data_dir):
    return sources.load_source("bbc_news", "validation", data_dir)


@pytest.fixture(scope="session")
def short_docs():
    """40 one-line documents, each shorter than SEQ_LEN tokens, numbered."""
    words = "shares in the firm rose on monday as analysts said the market".split()
    return [{"text": f"record {i} " + " ".join(words[: 2 + i % 9])} for i in range(40)]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _segments(batch):
    """(row, segment id, tokens) of every segment in a batch."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        seg_L = batch["segment_ids"][row]
        for seg in np.unique(seg_L[seg_L > 0]):
            out.append((row, int(seg), batch["tokens"][row][seg_L == seg]))
    return out


def _record_number(tok, tokens):
    match = re.match(r"record (\d+) ", tok.decode(tokens))
    assert match, f"no record number in {tok.decode(tokens)!r}"
    return int(match.group(1))


# --- sources ------------------------------------------------------------------


def test_bbc_news_has_disjoint_splits_covering_the_corpus(
    data_dir, train_source, valid_source
):
    train_ids = [r["id"] for r in train_source]
    valid_ids = [r["id"] for r in valid_source]
    assert len(train_ids) + len(valid_ids) == BBC_SIZE
    assert len(set(train_ids) | set(valid_ids)) == BBC_SIZE
    assert 0.02 * BBC_SIZE < len(valid_ids) < 0.10 * BBC_SIZE
    record = valid_source[0]
    assert isinstance(record["text"], str) and len(record["text"]) > 100
    category = sources.BBC_CATEGORIES[record["label"]]
    assert record["id"].startswith(category + "/")
    assert all(sources.bbc_split_of(i) == "validation" for i in valid_ids)


def test_prepare_is_idempotent(data_dir):
    assert sources.is_prepared("bbc_news", data_dir)
    dataset_dir = sources.prepare("bbc_news", data_dir)
    info = os.path.join(dataset_dir, "dataset_info.json")
    mtime = os.path.getmtime(info)
    assert sources.prepare("bbc_news", data_dir) == dataset_dir
    assert os.path.getmtime(info) == mtime


def test_bad_split_names_available_splits(data_dir):
    with pytest.raises(ValueError, match=r"'valid'.*\['train', 'validation'\]"):
        sources.load_source("bbc_news", "valid", data_dir)


def test_missing_dataset_raises_with_name_and_dir(tmp_path, data_dir):
    empty = str(tmp_path / "empty")
    for call in (sources.load_source, sources.check_dataset):
        args = ("no_such_corpus", "train") if call is sources.load_source else ()
        with pytest.raises(sources.DatasetNotFoundError) as info:
            call(*(args or ("no_such_corpus",)), data_dir=empty)
        message = str(info.value)
        assert "no_such_corpus" in message and empty in message
        assert "fmjax data prepare no_such_corpus" in message and "bbc_news" in message
    assert not sources.is_prepared("bbc_news", empty)
    sources.check_dataset("bbc_news", empty)  # Shipped: can be built on demand.
    sources.check_dataset("bbc_news", data_dir)


def test_default_data_dir_reads_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FMJAX_DATA_DIR", str(tmp_path))
    assert sources.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("FMJAX_DATA_DIR")
    assert sources.default_data_dir().endswith(os.path.join("fmjax", "datasets"))


# --- tokenizer ----------------------------------------------------------------


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert tok.id_to_piece(tok.mask_id) == "<mask>"
    assert set(tok.special_ids) == {0, 1, 2, 3, 4}
    assert tok.vocab_size == VOCAB
    assert isinstance(tok, tokenizer_lib.Tokenizer)


@pytest.mark.parametrize(
    "sentence",
    [
        "Shares in the firm rose 5% on Monday, analysts said.",
        'The naïve café owner said: "東京 is 42% bigger" - really?',
    ],
)
def test_round_trip(tok, sentence):
    ids = tok.encode(sentence)
    assert tok.unk_id not in ids  # Unseen characters fall back to bytes.
    assert tok.decode(ids) == sentence
    specials = [tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(specials) == sentence


def test_cached_tokenizer_reloads_identical(tok, data_dir, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer_for retrained a cached tokenizer")

    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", no_training)
    again = tokenizer_lib.tokenizer_for("bbc_news", VOCAB, data_dir)
    assert again.path == tok.path and again.model_proto == tok.model_proto
    saved = tok.save(tmp_path)
    assert saved == str(tmp_path / "tokenizer.model")
    loaded = tokenizer_lib.SentencePieceTokenizer.load(tmp_path)
    assert loaded.model_proto == tok.model_proto
    assert not [p for p in os.listdir(os.path.dirname(tok.path)) if ".part" in p]


def test_training_is_deterministic_and_checks_vocab_size(train_source, tmp_path):
    texts = [train_source[i]["text"] for i in range(150)]
    a = tokenizer_lib.train_sentencepiece(texts, 400, tmp_path / "a.model")
    b = tokenizer_lib.train_sentencepiece(iter(texts), 400, tmp_path / "b.model")
    assert a.model_proto == b.model_proto
    with pytest.raises(ValueError, match="vocab_size=50"):
        tokenizer_lib.train_sentencepiece(texts, 50, tmp_path / "c.model")


# --- packing ------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_document_chunks_split_long_documents(objective):
    ids = list(range(10, 10 + 150))
    chunks = text.document_chunks(
        ids, seq_len=SEQ_LEN, bos_id=2, eos_id=3, objective=objective
    )
    assert all(len(c) <= SEQ_LEN and c[0] == 2 for c in chunks)
    if objective == "causal":
        assert np.concatenate([c[1:] for c in chunks]).tolist() == ids + [3]
    else:
        assert all(c[-1] == 3 for c in chunks)
        assert np.concatenate([c[1:-1] for c in chunks]).tolist() == ids
    short = text.document_chunks([7, 8], seq_len=SEQ_LEN, bos_id=2, eos_id=3)
    assert [c.tolist() for c in short] == [[2, 7, 8, 3]]


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_packed_batch_invariants(tok, train_source, objective):
    iterator = text.make_text_iterator(
        train_source,
        tok,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=0,
        objective=objective,
    )
    for batch in _take(iterator, 5):
        assert sorted(batch) == sorted(text.BATCH_KEYS)
        for x_BL in batch.values():
            assert x_BL.shape == (BATCH, SEQ_LEN) and x_BL.dtype == np.int32
        tokens_BL, seg_BL, pos_BL = (batch[k] for k in text.BATCH_KEYS[:3])
        np.testing.assert_array_equal(tokens_BL != 0, seg_BL != 0)
        # Plain documents: every token is learned.
        np.testing.assert_array_equal(batch["loss_mask"], seg_BL != 0)
        assert np.all(pos_BL[seg_BL == 0] == 0)
        for row, seg, tokens in _segments(batch):
            mask = seg_BL[row] == seg
            np.testing.assert_array_equal(pos_BL[row][mask], np.arange(mask.sum()))
            assert np.all(np.diff(np.flatnonzero(mask)) == 1), "segment not contiguous"
            assert tokens[0] == tok.bos_id
            if objective == "mlm":
                assert tokens[-1] == tok.eos_id
        # Segment ids count up from 1 in each row.
        for row_L in seg_BL:
            used = np.unique(row_L[row_L > 0])
            np.testing.assert_array_equal(used, np.arange(1, len(used) + 1))


def test_short_documents_are_whole_segments(tok, short_docs):
    iterator = text.make_text_iterator(
        short_docs, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=3
    )
    batch = next(iterator)
    assert len(_segments(batch)) > BATCH  # Several documents per row.
    for _, _, tokens in _segments(batch):
        doc = short_docs[_record_number(tok, tokens)]["text"]
        expected = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
        assert tokens.tolist() == expected


@pytest.mark.parametrize(
    "prompt, completion, seq_len, tokens, mask",
    [
        ([5, 6, 7], [8, 9], 16, [1, 5, 6, 7, 8, 9, 2], [0, 0, 0, 0, 1, 1, 1]),
        ([5, 6, 7], [8, 9], 6, [1, 6, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1]),  # prompt cut
        ([5, 6, 7], [8, 9], 4, [1, 8, 9, 2], [0, 1, 1, 1]),  # no prompt left
        ([5], [8, 9, 10, 11], 4, [1, 8, 9, 10], [0, 1, 1, 1]),  # completion cut
    ],
)
def test_completion_chunk_learns_the_completion_only(
    prompt, completion, seq_len, tokens, mask
):
    chunk = text.completion_chunk(
        prompt, completion, seq_len=seq_len, bos_id=1, eos_id=2
    )
    assert chunk["tokens"].tolist() == tokens and chunk["loss_mask"].tolist() == mask


def test_prompt_completion_records_pack_with_their_loss_mask(tok):
    records = [
        {"prompt": f"record {i} shares rose", "completion": f" by {i} percent"}
        for i in range(30)
    ]
    iterator = text.make_text_iterator(
        records, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=1
    )
    batch = next(iterator)
    assert len(_segments(batch)) > BATCH  # several records a row
    for row, seg, tokens in _segments(batch):
        record = records[_record_number(tok, tokens)]
        prompt, completion = (
            tok.encode(record["prompt"]),
            tok.encode(record["completion"]),
        )
        assert tokens.tolist() == [tok.bos_id, *prompt, *completion, tok.eos_id]
        mask = batch["loss_mask"][row][batch["segment_ids"][row] == seg]
        assert mask.tolist() == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)


def test_same_seed_same_batches_other_seed_differs(tok, train_source):
    def first_batches(seed):
        iterator = text.make_text_iterator(
            train_source, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed
        )
        return np.stack([b["tokens"] for b in _take(iterator, 3)])

    np.testing.assert_array_equal(first_batches(1), first_batches(1))
    assert not np.array_equal(first_batches(1), first_batches(2))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_gives_the_same_batches(tok, short_docs, prefetch):
    def make():
        return text.make_text_iterator(
            short_docs,
            tok,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            seed=5,
            prefetch=prefetch,
        )

    # 40 short docs fill a few rows per batch: 12 batches cross epochs.
    reference = make()
    _take(reference, 7)
    state = json.loads(json.dumps(reference.get_state()))
    expected = _take(reference, 12)
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 12), strict=True):
        for key in text.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])


def test_processes_read_disjoint_slices(tok, short_docs):
    seen = []
    for process_index in range(2):
        iterator = text.make_text_iterator(
            short_docs,
            tok,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            seed=0,
            repeat=False,
            drop_remainder=False,
            process_index=process_index,
            process_count=2,
        )
        numbers = [
            _record_number(tok, tokens)
            for batch in iterator
            for _, _, tokens in _segments(batch)
        ]
        assert len(numbers) == len(set(numbers)) == len(short_docs) // 2
        seen.append(set(numbers))
    assert seen[0] == set(range(0, 40, 2)) and seen[1] == set(range(1, 40, 2))


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_eval_covers_every_chunk_once(tok, valid_source, objective):
    batches = list(
        text.make_eval_iterator(
            valid_source, tok, seq_len=SEQ_LEN, batch_size=BATCH, objective=objective
        )
    )
    assert all(b["tokens"].shape == (BATCH, SEQ_LEN) for b in batches)
    got = collections.Counter(
        tuple(tokens.tolist()) for b in batches for _, _, tokens in _segments(b)
    )
    want = collections.Counter(
        tuple(chunk.tolist())
        for record in valid_source
        for chunk in text.document_chunks(
            tok.encode(record["text"]),
            seq_len=SEQ_LEN,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            objective=objective,
        )
    )
    assert got == want
    # A fixed order: a second pass yields the same batches.
    again = text.make_eval_iterator(
        valid_source, tok, seq_len=SEQ_LEN, batch_size=BATCH, objective=objective
    )
    np.testing.assert_array_equal(next(again)["tokens"], batches[0]["tokens"])


def test_a_char_tokenizer_keeps_digits_apart(tmp_path):
    """data.tokenizer=char on a user's file: one piece per character, cached
    beside (not instead of) the default unigram model."""
    path = tmp_path / "sums.jsonl"
    rows = [
        {"prompt": f"{a} + {a + 7} =", "completion": f" {2 * a + 7}"}
        for a in range(200)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"jsonl:{path}"
    char = tokenizer_lib.tokenizer_for(name, 400, tmp_path, model_type="char")
    pieces = [char.decode([i]) for i in char.encode("1234+56")]
    assert pieces == ["", *"1234+56"]  # the word-start piece, then each character
    assert os.path.basename(char.path) == "spm_char_400.model"
    unigram = tokenizer_lib.tokenizer_for(name, 400, tmp_path)
    assert os.path.basename(unigram.path) == "spm_400.model"
    assert len(unigram.encode("1234+56")) < 7  # pieces of several characters
    with pytest.raises(ValueError, match="model_type='chars'; expected one of"):
        tokenizer_lib.tokenizer_for(name, 400, tmp_path, model_type="chars")
