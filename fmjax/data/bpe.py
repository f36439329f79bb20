"""Byte-level BPE tokenizers of imported GPT-2 models (HF `tokenizer.json`, or
GPT-2's original `vocab.json` + `merges.txt`).

Built on the `tokenizers` library, so ids equal those of
`transformers.GPT2TokenizerFast`. Every string is a sequence of bytes, so no
text is unknown and `decode(encode(text)) == text` for any text without the
special tokens' own strings.

GPT-2 has one special token, `<|endoftext|>` (id 50256), which separates
documents: it serves as bos, eos and pad here (HF pads GPT-2 with eos too).
GPT-2 has no unknown-token or mask token, so `unk_id` and `mask_id` are the
eos id as well: byte-level text never needs unk, and a decoder is not trained
with masking. A `tokenizer_config.json` beside the vocabulary may name other
tokens for these roles (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
`mask_token`), as RoBERTa-style byte-level BPE vocabularies do.

CLIP's tokenizer (`CLIPBPETokenizer`) is byte-level BPE too, over lower-cased
NFC text, with `</w>` ending each word's last token; it has its own bos
`<|startoftext|>` and eos `<|endoftext|>` (also pad and unk). Like every fmjax
tokenizer its `encode` adds nothing: bos + `encode(text)` + eos, as
`fmjax.data.captions.encode_captions` builds a caption, is what
`transformers.CLIPTokenizer` gives (CLIP's text tower reads the eos state).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from fmjax.data.tokenizer import write_file

JSON_FILENAME = "tokenizer.json"
VOCAB_FILENAME = "vocab.json"
MERGES_FILENAME = "merges.txt"
CONFIG_FILENAME = "tokenizer_config.json"
SPECIAL_MAP_FILENAME = "special_tokens_map.json"
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT = "<|startoftext|>"
# CLIP's BPE marks a word's last token with this suffix.
END_OF_WORD = "</w>"
# Role -> GPT-2's token; tokenizer_config.json / special_tokens_map.json override.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": END_OF_TEXT,
    "eos_token": END_OF_TEXT,
    "pad_token": END_OF_TEXT,
    "unk_token": END_OF_TEXT,
    "mask_token": END_OF_TEXT,
}


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


def _json_model(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            model = json.load(f).get("model") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return model if isinstance(model, dict) else {}


def is_bpe_json(path: str | os.PathLike) -> bool:
    """Whether the HF `tokenizer.json` at `path` holds a BPE model."""
    return _json_model(path).get("type") == "BPE"


def is_clip_json(path: str | os.PathLike) -> bool:
    """Whether the HF `tokenizer.json` at `path` holds CLIP's BPE (words end
    in `</w>`)."""
    model = _json_model(path)
    return model.get("type") == "BPE" and model.get("end_of_word_suffix") == END_OF_WORD


def gpt2_backend(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer over `vocab.json` + `merges.txt`, built as transformers
    converts GPT2Tokenizer to GPT2TokenizerFast (no prefix space, byte-level
    pre-tokenizer and decoder, nothing added around a text)."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


class ByteLevelBPETokenizer:
    """A byte-level BPE vocabulary (GPT-2's) behind fmjax's `Tokenizer` protocol."""

    default_special_tokens = DEFAULT_SPECIAL_TOKENS

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        path: str,
        *,
        special_tokens: Mapping[str, str] | None = None,
    ):
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.path = path
        self._special_tokens = {
            **self.default_special_tokens,
            **(special_tokens or {}),
        }
        self._ids = {}
        missing = []
        for role, token in self._special_tokens.items():
            token_id = backend.token_to_id(token)
            if token_id is None:
                missing.append(f"{role}={token!r}")
            self._ids[role] = token_id
        if missing:
            raise ValueError(
                f"BPE vocabulary {path} lacks the special tokens {missing}; expected "
                f"them in the vocabulary (GPT-2's is {END_OF_TEXT!r})"
            )
        # Marked special: `decode` drops them and `encode` keeps them whole.
        backend.add_special_tokens(sorted(set(self._special_tokens.values())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> ByteLevelBPETokenizer:
        """From a directory (tokenizer.json, else vocab.json + merges.txt; special
        tokens from its tokenizer_config.json), or a tokenizer.json file."""
        path = os.fspath(path_or_dir)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        config = {
            **_read_json(os.path.join(directory, SPECIAL_MAP_FILENAME)),
            **_read_json(os.path.join(directory, CONFIG_FILENAME)),
        }
        special_tokens = {
            role: _token_text(config.get(role)) or default
            for role, default in cls.default_special_tokens.items()
        }
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, JSON_FILENAME)):
            path = os.path.join(path, JSON_FILENAME)
        if os.path.isfile(path):
            if not is_bpe_json(path):
                raise ValueError(
                    f"{path} is not an HF tokenizer.json with a BPE model; expected "
                    f'"model": {{"type": "BPE", ...}}'
                )
            backend = tokenizers.Tokenizer.from_file(path)
            return cls(backend, path, special_tokens=special_tokens)
        vocab = os.path.join(directory, VOCAB_FILENAME)
        merges = os.path.join(directory, MERGES_FILENAME)
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            raise FileNotFoundError(
                f"no byte-level BPE tokenizer in {path!r}: expected {JSON_FILENAME} "
                f"or {VOCAB_FILENAME} + {MERGES_FILENAME}"
            )
        return cls(gpt2_backend(vocab, merges), vocab, special_tokens=special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """<|endoftext|> for GPT-2 (it has no pad token; HF pads with eos)."""
        return self._ids["pad_token"]

    @property
    def unk_id(self) -> int:
        """<|endoftext|> for GPT-2: byte-level BPE has no unknown text."""
        return self._ids["unk_token"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def mask_id(self) -> int:
        """<|endoftext|> for GPT-2, which has no mask token."""
        return self._ids["mask_token"]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The distinct special ids (GPT-2: just <|endoftext|>)."""
        return tuple(sorted(set(self._ids.values())))

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added (a special token's own string in the
        text becomes its id, as in transformers)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, without the special tokens; bytes that do not complete a
        UTF-8 character decode to U+FFFD."""
        special = set(self.special_ids)
        kept = [int(i) for i in ids if int(i) not in special]
        return self._backend.decode(kept, skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes tokenizer.json and tokenizer_config.json (the special tokens, for
        `transformers.AutoTokenizer`) to `directory`; returns the tokenizer.json
        path."""
        text = self._backend.to_str(pretty=True)
        path = write_file(directory, JSON_FILENAME, text.encode("utf-8"))
        # No mask token unless the vocabulary has its own: GPT-2 has none.
        tokens = {
            role: token
            for role, token in self._special_tokens.items()
            if role != "mask_token" or token != self._special_tokens["eos_token"]
        }
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            **tokens,
        }
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_file(directory, CONFIG_FILENAME, text.encode("utf-8"))
        return path


class CLIPBPETokenizer(ByteLevelBPETokenizer):
    """CLIP's BPE from an HF `tokenizer.json` (its normaliser, pre-tokenizer and
    `</w>` word ends as stored there). `[bos_id, *encode(text), eos_id]` is
    what `transformers.CLIPTokenizer` gives by default."""

    default_special_tokens = {
        "bos_token": START_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "mask_token": END_OF_TEXT,
    }
    # tokenizer_config.json's, kept for `save` (CLIP's is 77).
    model_max_length: int | None = None

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> CLIPBPETokenizer:
        """From a directory with a CLIP tokenizer.json (special tokens from its
        tokenizer_config.json), or that file."""
        path = os.fspath(path_or_dir)
        json_path = os.path.join(path, JSON_FILENAME) if os.path.isdir(path) else path
        if not is_clip_json(json_path):
            raise FileNotFoundError(
                f"no CLIP tokenizer at {path!r}: expected an HF {JSON_FILENAME} "
                f'with a BPE model whose end_of_word_suffix is "{END_OF_WORD}"'
            )
        tokenizer = super().load(json_path)
        config = _read_json(os.path.join(os.path.dirname(json_path), CONFIG_FILENAME))
        tokenizer.model_max_length = config.get("model_max_length")
        return tokenizer

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without the special tokens: words joined by spaces,
        lower-cased as CLIP's normaliser left them."""
        return super().decode(ids).replace(END_OF_WORD, " ").strip()

    def save(self, directory: str | os.PathLike) -> str:
        """Writes tokenizer.json and a tokenizer_config.json that
        `transformers.AutoTokenizer` reads as a CLIPTokenizer."""
        path = write_file(
            directory, JSON_FILENAME, self._backend.to_str(pretty=True).encode("utf-8")
        )
        config = {
            "tokenizer_class": "CLIPTokenizer",
            **{k: v for k, v in self._special_tokens.items() if k != "mask_token"},
        }
        if self.model_max_length:
            config["model_max_length"] = int(self.model_max_length)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_file(directory, CONFIG_FILENAME, text.encode("utf-8"))
        return path
