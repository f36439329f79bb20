"""A user's image-caption pairs as a dataset: `data.name=csv:FILE` or `jsonl:FILE`.

    image,caption,split                  {"image": "cats/1.jpg", "caption": "a cat"}
    cats/1.jpg,a cat asleep,train        {"image": "/data/dog.png", "caption": "a dog"}
    cats/1.jpg,"a cat, asleep",train
    /data/dog.png,a dog on grass,test

A CSV file with a header row, or a JSON object per line, names an image and
one of its captions per row (columns `image` and `caption` unless the caller
names others). Image paths are relative to the file's directory, or absolute.
Rows that name the same image make one record, in order of the image's first
row: {"image": uint8 [H, W, C], "captions": [str, ...]}, decoded by Pillow when
the pipeline reads it (as `fmjax.data.folders` does). An optional `split`
column puts rows in splits (train, validation, test, ...; an image belongs to
one split); without it every row is in "train". A split name may take a slice,
as TFDS's: "train[:90%]", "train[90%:]".

The scan at start-up reads the file and checks that every image exists (it
opens none); errors name the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from fmjax.data import folders
from fmjax.errors import FormatError

PREFIXES = ("csv:", "jsonl:")
COLUMNS = ("image", "caption")
SPLIT_COLUMN = "split"
_KEYS_HINT = "other names: data.image_key / data.caption_key"

# One record: the image's resolved path and its captions, in file order.
Record = tuple[str, tuple[str, ...]]


def _read_csv(path: str, needed: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each row; checks the header and field counts."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []  # [] for an empty file
            missing = [c for c in needed if c not in header]
            if header and missing:
                raise FormatError(
                    f"{path} line 1 (header): no column {missing}; columns found: "
                    f"{header}; expected image and caption columns {list(needed)} "
                    f"({_KEYS_HINT})"
                )
            for row in reader:
                extra, absent = row.get(None, ()), list(row.values()).count(None)
                if extra or absent:
                    raise FormatError(
                        f"{path} line {reader.line_num}: "
                        f"{len(header) + len(extra) - absent} fields, the header "
                        f"has {len(header)} (quote a caption that holds a comma: "
                        '"a cat, asleep")'
                    )
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise FormatError(f"{path} line {reader.line_num}: {e}") from None
    return rows


def _read_jsonl(path: str, needed: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; checks the needed keys."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path} line {number}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise FormatError(
                    f"{path} line {number}: a JSON {type(row).__name__}; expected "
                    f"an object with keys {list(needed)}"
                )
            missing = [c for c in needed if c not in row]
            if missing:
                raise FormatError(
                    f"{path} line {number}: no column {missing}; columns found: "
                    f"{sorted(row)}; expected image and caption columns "
                    f"{list(needed)} ({_KEYS_HINT})"
                )
            rows.append((number, row))
    return rows


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise FormatError(
            f"{where}: column {key!r} holds {value!r}; expected a string (one "
            "row per image-caption pair)"
        )
    return value.strip()


def _group(
    path: str, rows: list[tuple[int, dict[str, Any]]], columns: tuple[str, str]
) -> dict[str, tuple[Record, ...]]:
    """Rows -> {split: records}, each image's captions in one record."""
    image_key, caption_key = columns
    has_split = any(SPLIT_COLUMN in row for _, row in rows)
    directory = os.path.dirname(path)
    captions: dict[str, dict[str, list[str]]] = {}  # split -> image -> captions
    first_row: dict[str, tuple[str, int]] = {}  # image -> (split, line)
    for line, row in rows:
        where = f"{path} line {line}"
        image, caption = _text(row, image_key, where), _text(row, caption_key, where)
        if not image:
            raise FormatError(f"{where}: empty image path (column {image_key!r})")
        if not caption:
            raise FormatError(f"{where}: empty caption (column {caption_key!r})")
        split = "train"
        if has_split:
            split = _text(row, SPLIT_COLUMN, where) if SPLIT_COLUMN in row else ""
            if not re.fullmatch(r"\w+", split):
                raise FormatError(
                    f"{where}: split {split!r} in column {SPLIT_COLUMN!r}; expected "
                    "a name of letters, digits and _ (train, validation, test)"
                )
        resolved = os.path.normpath(os.path.join(directory, os.path.expanduser(image)))
        if resolved not in first_row:
            if not os.path.isfile(resolved):
                raise FileNotFoundError(
                    f"{where}: image {image!r} not found: no file {resolved} "
                    f"(relative paths start at the file's directory, {directory})"
                )
            first_row[resolved] = (split, line)
        elif first_row[resolved][0] != split:
            first_split, first_line = first_row[resolved]
            raise FormatError(
                f"{where}: image {resolved} in split {split!r}, but line "
                f"{first_line} put it in {first_split!r}; an image's captions "
                "make one record, in one split"
            )
        captions.setdefault(split, {}).setdefault(resolved, []).append(caption)
    return {
        split: tuple((image, tuple(texts)) for image, texts in images.items())
        for split, images in captions.items()
    }


@dataclasses.dataclass(frozen=True)
class PairsDataset:
    """The splits of an image-caption file: {split: [(image path, captions)]},
    images in order of first appearance."""

    name: str  # "csv:PATH" or "jsonl:PATH", for errors
    splits: dict[str, tuple[Record, ...]]

    @classmethod
    def scan(cls, kind: str, path: str, columns: tuple[str, str]) -> PairsDataset:
        read = _read_csv if kind == "csv" else _read_jsonl
        try:
            rows = read(path, columns)
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not UTF-8 text ({e})") from None
        if not rows:
            layout = "a header row, then a row" if kind == "csv" else "a JSON line"
            raise FormatError(
                f"{path}: no rows; expected {layout} per image-caption pair "
                f"(columns {list(columns)})"
            )
        return cls(f"{kind}:{path}", _group(path, rows, columns))

    def features(self) -> dict[str, Any]:
        return {
            "image": tfds.features.Image(shape=(None, None, None)),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }

    def source(self, split: str) -> PairsSource:
        return PairsSource(folders.select_split(self.splits, split, self.name))


class PairsSource(Sequence):
    """Random access to a split's images, decoded on read, and their captions."""

    def __init__(self, records: Sequence[Record]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, captions = self._records[index]
        return {"image": folders.read_image(path), "captions": list(captions)}

    def __repr__(self) -> str:
        return f"PairsSource({len(self)} images)"


@functools.lru_cache(maxsize=4)
def _cached_scan(kind, path, stamp, columns) -> PairsDataset:
    del stamp  # (mtime, size): an edited file scans again.
    return PairsDataset.scan(kind, path, columns)


def pairs_dataset(name: str, columns: Sequence[str] = COLUMNS) -> PairsDataset:
    """`csv:FILE` or `jsonl:FILE` scanned; `columns`: its image and caption
    columns. The scan is cached while the file is unchanged."""
    kind, _, path = name.partition(":")
    if kind + ":" not in PREFIXES:
        raise ValueError(f"{name!r}: expected a name starting with {PREFIXES}")
    columns = tuple(columns)
    if len(columns) != 2 or len(set(columns)) != 2 or not all(columns):
        raise ValueError(
            f"columns={columns}; expected two different names, the image column "
            "and the caption column"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name}: no such file {path}; expected a "
            f"{kind.upper()} file of image paths and captions (columns "
            f"{list(columns)})"
        )
    info = os.stat(path)
    return _cached_scan(kind, path, (info.st_mtime_ns, info.st_size), columns)


def user_dataset(
    name: str, columns: Sequence[str] = COLUMNS
) -> folders.FolderDataset | PairsDataset | None:
    """A user's own images: `folder:DIR` (fmjax.data.folders) or image-caption
    pairs, `csv:FILE` / `jsonl:FILE`; None for other names (TFDS datasets)."""
    if name.startswith(folders.PREFIX):
        return folders.folder_dataset(name)
    if name.startswith(PREFIXES):
        return pairs_dataset(name, columns)
    return None
