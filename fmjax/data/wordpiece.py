"""WordPiece tokenizers of imported BERT models (HF `tokenizer.json` or `vocab.txt`).

Built on the `tokenizers` library (the Rust engine behind HF fast tokenizers), so
ids equal those of `transformers.BertTokenizerFast`. [CLS] plays bos and [SEP]
eos, so `fmjax.api.Model.encode_batch` wraps a text as BERT expects. `encode`
adds no special tokens and ignores the padding/truncation settings a
tokenizer.json may carry; callers wrap, truncate and pad.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from fmjax.data.tokenizer import write_file

VOCAB_FILENAME = "vocab.txt"
JSON_FILENAME = "tokenizer.json"
CONFIG_FILENAME = "tokenizer_config.json"
SPECIAL_MAP_FILENAME = "special_tokens_map.json"
# Role -> BERT's token; tokenizer_config.json / special_tokens_map.json override.
DEFAULT_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
_NORMALIZER_OPTIONS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a str or an AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


class WordPieceTokenizer:
    """A BERT WordPiece vocabulary behind fmjax's `Tokenizer` protocol."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        path: str,
        *,
        special_tokens: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
        from_json: bool = False,
    ):
        """`options`: normalizer settings written back to tokenizer_config.json."""
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.path = path
        self._from_json = from_json
        self._options = dict(options or {})
        self._special_tokens = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        self._ids = {}
        missing = []
        for role, token in self._special_tokens.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                missing.append(f"{role}={token!r}")
            self._ids[role] = token_id
        if missing:
            raise ValueError(
                f"WordPiece vocabulary {path} lacks the special tokens {missing}; "
                f"fmjax needs {sorted(DEFAULT_SPECIAL_TOKENS)} in the vocabulary"
            )

    def __repr__(self) -> str:
        return f"WordPieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_vocab(
        cls,
        vocab_path: str | os.PathLike,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        special_tokens: Mapping[str, str] | None = None,
    ) -> WordPieceTokenizer:
        """BERT's tokenizer over a `vocab.txt` (one token a line, id = line number).

        `strip_accents=None` strips accents exactly when lowercasing, as BERT does.
        """
        vocab_path = os.fspath(vocab_path)
        tokens = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        backend = tokenizers.Tokenizer(
            models.WordPiece(
                models.WordPiece.read_file(vocab_path),
                unk_token=tokens["unk_token"],
                max_input_chars_per_word=100,
            )
        )
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=tokenize_chinese_chars,
            strip_accents=strip_accents,
            lowercase=do_lower_case,
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        backend.add_special_tokens(
            [t for t in tokens.values() if backend.token_to_id(t) is not None]
        )
        options = dict(
            do_lower_case=do_lower_case,
            strip_accents=strip_accents,
            tokenize_chinese_chars=tokenize_chinese_chars,
        )
        return cls(backend, vocab_path, special_tokens=tokens, options=options)

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> WordPieceTokenizer:
        """From a directory (tokenizer.json, else vocab.txt; special tokens and
        lowercasing from its tokenizer_config.json), or one of those two files."""
        path = os.fspath(path_or_dir)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        config = {
            **_read_json(os.path.join(directory, SPECIAL_MAP_FILENAME)),
            **_read_json(os.path.join(directory, CONFIG_FILENAME)),
        }
        special_tokens = {
            role: _token_text(config.get(role)) or default
            for role, default in DEFAULT_SPECIAL_TOKENS.items()
        }
        if os.path.isdir(path):
            for name in (JSON_FILENAME, VOCAB_FILENAME):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(
                    f"no WordPiece tokenizer in {path!r}: expected {JSON_FILENAME} "
                    f"or {VOCAB_FILENAME}"
                )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no WordPiece tokenizer file at {path!r}")
        options = {k: config[k] for k in _NORMALIZER_OPTIONS if k in config}
        if path.endswith(".json"):
            backend = tokenizers.Tokenizer.from_file(path)
            normalizer = json.loads(backend.to_str()).get("normalizer") or {}
            if normalizer.get("type") == "BertNormalizer":
                options.setdefault("do_lower_case", normalizer["lowercase"])
                options.setdefault("strip_accents", normalizer["strip_accents"])
                options.setdefault(
                    "tokenize_chinese_chars", normalizer["handle_chinese_chars"]
                )
            return cls(
                backend,
                path,
                special_tokens=special_tokens,
                options=options,
                from_json=True,
            )
        return cls.from_vocab(path, special_tokens=special_tokens, **options)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad_token"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk_token"]

    @property
    def bos_id(self) -> int:
        """[CLS]."""
        return self._ids["cls_token"]

    @property
    def eos_id(self) -> int:
        """[SEP]."""
        return self._ids["sep_token"]

    @property
    def mask_id(self) -> int:
        return self._ids["mask_token"]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.unk_id)

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, without the special tokens (pad, CLS, SEP, mask, unk)."""
        special = set(self.special_ids)
        kept = [int(i) for i in ids if int(i) not in special]
        return self._backend.decode(kept, skip_special_tokens=True)

    def vocab(self) -> list[str]:
        """Tokens in id order (what vocab.txt holds)."""
        by_id = self._backend.get_vocab(with_added_tokens=True)
        tokens = sorted(by_id, key=by_id.get)
        if [by_id[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(
                f"WordPiece vocabulary {self.path} has gaps in its ids; expected "
                f"ids 0..{len(tokens) - 1}"
            )
        return tokens

    def save(self, directory: str | os.PathLike) -> str:
        """Writes vocab.txt, tokenizer_config.json and (when loaded from one)
        tokenizer.json to `directory`; returns the path of the main file."""
        vocab = "".join(token + "\n" for token in self.vocab())
        path = write_file(directory, VOCAB_FILENAME, vocab.encode("utf-8"))
        config = {
            "tokenizer_class": "BertTokenizer",
            **self._options,
            **self._special_tokens,
        }
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_file(directory, CONFIG_FILENAME, text.encode("utf-8"))
        if self._from_json:
            text = self._backend.to_str(pretty=True)
            path = write_file(directory, JSON_FILENAME, text.encode("utf-8"))
        return path
