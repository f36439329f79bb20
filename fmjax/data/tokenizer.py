"""Tokenizers: SentencePiece (train + load), WordPiece (imported BERT vocabs, in
`fmjax.data.wordpiece`) and byte-level BPE (imported GPT-2 vocabs, in
`fmjax.data.bpe`), behind one `Tokenizer` protocol.

fmjax-trained SentencePiece models use fixed ids: pad 0, unk 1, bos 2, eos 3
and the user-defined `<mask>` 4; bos doubles as CLS and eos as SEP for
encoders. Text is NFKC-normalised and runs of whitespace (newlines included)
become one space, so `decode(encode(x)) == x` for text in that normal form.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "<mask>"
MODEL_FILENAME = "tokenizer.model"
MODEL_TYPES = ("unigram", "bpe", "char", "word")
_MAX_LINE_BYTES = 1 << 16


@runtime_checkable
class Tokenizer(Protocol):
    """What pipelines and models need from a tokenizer."""

    path: str

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def unk_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def special_ids(self) -> tuple[int, ...]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> str: ...


def _write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` so readers see either no file or the whole file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_file(directory: str | os.PathLike, name: str, data: bytes) -> str:
    """Writes `directory/name` (atomically when local); returns its path."""
    directory = os.fspath(directory)
    if "://" in directory:  # a remote workdir (gs://...): no rename there
        from etils import epath

        path = epath.Path(directory) / name
        path.write_bytes(data)
        return str(path)
    path = os.path.join(directory, name)
    _write_atomic(path, data)
    return path


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in `directory`: SentencePiece (`tokenizer.model`),
    byte-level BPE (a `tokenizer.json` with a BPE model, or `vocab.json` +
    `merges.txt`, as imported GPT-2 models have; CLIP's `</w>` BPE) or
    WordPiece (`tokenizer.json` or `vocab.txt`, as imported BERT models have)."""
    from fmjax.data import bpe, wordpiece

    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, MODEL_FILENAME)):
        return SentencePieceTokenizer.load(directory)
    json_path = os.path.join(directory, bpe.JSON_FILENAME)
    gpt2_files = (bpe.VOCAB_FILENAME, bpe.MERGES_FILENAME)
    if os.path.isfile(json_path):
        if bpe.is_clip_json(json_path):
            return bpe.CLIPBPETokenizer.load(directory)
        if bpe.is_bpe_json(json_path):
            return bpe.ByteLevelBPETokenizer.load(directory)
    elif all(os.path.isfile(os.path.join(directory, name)) for name in gpt2_files):
        return bpe.ByteLevelBPETokenizer.load(directory)
    names = (wordpiece.JSON_FILENAME, wordpiece.VOCAB_FILENAME)
    if any(os.path.isfile(os.path.join(directory, name)) for name in names):
        return wordpiece.WordPieceTokenizer.load(directory)
    raise FileNotFoundError(
        f"no tokenizer in {directory!r}: expected {MODEL_FILENAME} (SentencePiece), "
        f"{bpe.JSON_FILENAME} or {' + '.join(gpt2_files)} (byte-level BPE), or "
        f"{wordpiece.VOCAB_FILENAME} (WordPiece)"
    )


class SentencePieceTokenizer:
    """A SentencePiece model file; ids are read from the model."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._init_from_proto(f.read())

    def _init_from_proto(self, model_proto: bytes) -> None:
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        missing = [
            name
            for name, value in (
                ("pad", self._sp.pad_id()),
                ("bos", self._sp.bos_id()),
                ("eos", self._sp.eos_id()),
            )
            if value < 0
        ]
        mask_id = self._sp.piece_to_id(MASK_PIECE)
        if mask_id == self._sp.unk_id():
            missing.append(MASK_PIECE)
        if missing:
            raise ValueError(
                f"SentencePiece model {self.path} lacks {missing}; fmjax needs "
                f"pad, bos, eos ids and a {MASK_PIECE!r} piece (train one with "
                "fmjax.data.tokenizer.train_sentencepiece)"
            )
        self._mask_id = mask_id

    # Pickling keeps the model bytes, so pipelines can use worker processes.
    def __getstate__(self) -> dict:
        return {"path": self.path, "model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._init_from_proto(state["model_proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.unk_id)

    @property
    def model_proto(self) -> bytes:
        """The serialised model (what `save` writes)."""
        return self._model_proto

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad, bos and eos are dropped."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def save(self, directory: str | os.PathLike) -> str:
        """Copies the model to `directory/tokenizer.model`; returns that path."""
        return write_file(directory, MODEL_FILENAME, self._model_proto)

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> SentencePieceTokenizer:
        """From a .model file, or a directory holding `tokenizer.model`."""
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            path = os.path.join(path, MODEL_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No SentencePiece model at {path!r} (expected a .model file or "
                f"a directory with {MODEL_FILENAME})"
            )
        return cls(path)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty stripped lines: SentencePiece trains on sentences, not documents."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    output_path: str | os.PathLike,
    model_type: str = "unigram",
    hard_vocab_limit: bool = True,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on `texts` and writes it to `output_path`.
    `hard_vocab_limit=False`: `vocab_size` is an upper bound (a small corpus,
    such as a few thousand captions, may support fewer pieces).

    Deterministic: every line is used (no sampling) and training runs on one
    thread, so the same texts give the same model file on any machine.
    Characters outside the vocab fall back to byte pieces, never to unk.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
    lines = _lines(texts)
    first = next(lines, None)
    if first is None:
        raise ValueError("train_sentencepiece got no non-empty text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=[MASK_PIECE],
            byte_fallback=True,
            input_sentence_size=0,  # all lines
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_LINE_BYTES,
            num_threads=1,  # multi-threaded training depends on the thread count
            hard_vocab_limit=hard_vocab_limit,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece could not train vocab_size={vocab_size} on this corpus "
            f"(model_type={model_type!r}): {e}"
        ) from e
    output_path = os.fspath(output_path)
    _write_atomic(output_path, model.getvalue())
    return SentencePieceTokenizer(output_path)


def tokenizer_for(
    dataset_name: str,
    vocab_size: int,
    data_dir: str | os.PathLike | None = None,
    *,
    text_key: str = "text",
    model_type: str = "unigram",
) -> SentencePieceTokenizer:
    """The SentencePiece model of a dataset's train split, trained once;
    `model_type` "char" gives one piece per character (digits stay digits).

    Cached at `<data_dir>/<dataset_name>/spm_<vocab_size>.model` (other model
    types: `spm_<type>_<vocab_size>.model`; a user's `jsonl:FILE`: under a name
    derived from the file, `documents.cache_name`).
    """
    from fmjax.data import documents, sources

    data_dir = os.fspath(data_dir) if data_dir else sources.default_data_dir()
    user_file = documents.is_user_file(dataset_name)
    folder = documents.cache_name(dataset_name) if user_file else dataset_name
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
    kind = "" if model_type == "unigram" else f"{model_type}_"
    path = os.path.join(data_dir, folder, f"spm_{kind}{vocab_size}.model")
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    if user_file:
        rows = documents.load_documents(dataset_name, "train", text_key)
        # A small file may support fewer pieces than asked for.
        return train_sentencepiece(
            documents.texts_of(rows, text_key),
            vocab_size,
            path,
            model_type,
            hard_vocab_limit=False,
        )
    source = sources.load_source(dataset_name, "train", data_dir)
    if len(source) and text_key not in source[0]:
        raise KeyError(
            f"Dataset {dataset_name!r} has no {text_key!r} feature; "
            f"features: {sorted(source[0])}"
        )
    texts = (source[i][text_key] for i in range(len(source)))
    return train_sentencepiece(
        texts, vocab_size, path, model_type, hard_vocab_limit=model_type != "char"
    )
