"""A user's documents for the text tasks: `data.name=jsonl:FILE` or `csv:FILE`.

Each row is a document, `{"text": ...}` (the field `data.text_key` names), or a
prompt and its completion, `{"prompt": ..., "completion": ...}`: a causal model
then reads both but learns only the completion (the loss counts the
completion's tokens and the end of text; supervised fine-tuning, or the query
label of an in-context learning sequence). A `split` column assigns rows to
splits; without one, a seeded tenth of the rows is `validation` and the rest
`train`, as for labelled files (`fmjax.data.labeled`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from fmjax.data import labeled
from fmjax.data.text import COMPLETION_KEY, PROMPT_KEY

VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0


def is_user_file(name: str) -> bool:
    return labeled.file_of(name) is not None


def load_documents(name: str, split: str, text_key: str = "text") -> list[dict]:
    """The rows of `split`, each with `text_key` or `prompt` and `completion`
    (strings); a row with neither raises ValueError naming its line."""
    kind, path = labeled.file_of(name)
    rows = labeled.read_rows(kind, path)
    for number, row in enumerate(rows, 1):
        if not _is_document(row, text_key):
            raise ValueError(
                f"{path} row {number}: expected a {text_key!r} string or "
                f"{PROMPT_KEY!r} and {COMPLETION_KEY!r} strings; it has "
                f"{sorted(row)}"
            )
    return labeled.file_split(rows, split, path, VALIDATION_FRACTION, SPLIT_SEED)


def _is_document(row: dict[str, Any], text_key: str) -> bool:
    if isinstance(row.get(text_key), str):
        return True
    return isinstance(row.get(PROMPT_KEY), str) and isinstance(
        row.get(COMPLETION_KEY), str
    )


def texts_of(rows: Sequence[dict], text_key: str = "text") -> list[str]:
    """What a tokenizer trains on: each row's text, or prompt + completion."""
    return [
        row[text_key] if isinstance(row.get(text_key), str)
        else row[PROMPT_KEY] + row[COMPLETION_KEY]
        for row in rows
    ]  # fmt: skip


def cache_name(name: str) -> str:
    """A folder name for what is derived from a user's file (its tokenizer),
    which changes when the file does."""
    _, path = labeled.file_of(name)
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"file_{stem}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
