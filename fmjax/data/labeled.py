"""Labeled text for classification: sources (batches: fmjax.data.classification).

A dataset name is a TFDS name (`rotten_tomatoes`, `bbc_news`, any prepared
catalog name) or a user file, `csv:PATH` or `jsonl:PATH`:

    source = load_labeled_source("csv:reviews.csv", "train")
    source[0]                  # {"text": "...", "label": 1}
    source.label_names         # ["negative", "positive"]

A file's rows need the text fields (default `text`; `premise`, `hypothesis`
for sentence pairs) and the label field. Labels are strings (ids follow the
sorted names, or `label_names` when given) or integers (used as ids). A
`split` column assigns rows to splits; without one, a seeded shuffle of the
rows puts `validation_fraction` of them in `validation`, the rest in `train`.

"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fmjax.data import sources

FILE_KINDS = ("csv", "jsonl")
SPLIT_COLUMN = "split"


class LabeledSource(Sequence):
    """Random-access examples `{text_field: str, ..., "label": int}`."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        *,
        label_names: Sequence[str],
        text_fields: Sequence[str],
        label_field: str = "label",
        description: str = "",
    ):
        self._records = records
        self.label_names = list(label_names)
        self.text_fields = tuple(text_fields)
        self._label_field = label_field
        self._description = description

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self._records)

    def _example(self, record: dict[str, Any]) -> dict[str, Any]:
        example = {field: record[field] for field in self.text_fields}
        example["label"] = int(record[self._label_field])
        return example

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._example(self._records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if hasattr(self._records, "__getitems__"):
            records = self._records.__getitems__(list(indices))
        else:
            records = [self._records[i] for i in indices]
        return [self._example(r) for r in records]

    def labels(self) -> np.ndarray:
        """Every example's label id, [len(self)] int32 (reads the whole split)."""
        chunk = 1024
        out = []
        for start in range(0, len(self), chunk):
            indices = range(start, min(start + chunk, len(self)))
            out.extend(e["label"] for e in self.__getitems__(indices))
        return np.asarray(out, dtype=np.int32)

    def __repr__(self) -> str:
        return (
            f"LabeledSource({self._description}, {len(self)} examples, "
            f"labels={self.label_names})"
        )


# --- user files -----------------------------------------------------------------


def file_of(name: str) -> tuple[str, str] | None:
    """'csv:PATH' -> ('csv', PATH); None for a TFDS name."""
    kind, sep, path = name.partition(":")
    if sep and kind in FILE_KINDS:
        return kind, os.path.expanduser(path)
    return None


def read_rows(kind: str, path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} dataset file {path!r} does not exist")
    if kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_number}: not JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path} line {line_number}: expected a JSON object, got "
                    f"{type(row).__name__}"
                )
            rows.append(row)
    return rows


def _as_int(value: Any) -> int | None:
    """An integer label (7, "7", " 7 "), else None."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _label_ids(
    values: Sequence[Any], label_names: Sequence[str] | None, where: list[str]
) -> tuple[list[int], list[str]]:
    """Label values -> (ids, names); `where[i]` names value i for errors.

    Given `label_names`, a value equal to a name maps to its index, and an
    integer in range is an index. Otherwise integers are ids (names "0".."max")
    and strings map to their index among the sorted distinct values.
    """
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
    elif all(_as_int(v) is not None for v in values):
        ints = [_as_int(v) for v in values]
        names = [str(i) for i in range(max(ints, default=-1) + 1)]
        index = {}
    else:
        names = sorted({str(v) for v in values})
        index = {n: i for i, n in enumerate(names)}
    ids = []
    for value, place in zip(values, where, strict=True):
        label = index.get(str(value))
        if label is None:
            label = _as_int(value)
            if label is None or not 0 <= label < len(names):
                raise ValueError(
                    f"{place}: unknown label {value!r}; known labels: {names}"
                )
        ids.append(label)
    return ids, names


@functools.lru_cache(maxsize=8)
def _parse_file(
    kind: str,
    path: str,
    stamp: tuple[int, int],
    text_fields: tuple[str, ...],
    label_field: str,
    label_names: tuple[str, ...] | None,
) -> tuple[tuple[dict[str, Any], ...], list[str]]:
    """All rows as `{text fields, label_field: id, split?}`, and the label names.

    `stamp` (mtime, size) makes an edited file parse again.
    """
    del stamp
    rows = read_rows(kind, path)
    if not rows:
        raise ValueError(f"{kind} dataset file {path} has no rows")
    needed = (*text_fields, label_field)
    where = []
    for number, row in enumerate(rows, start=2 if kind == "csv" else 1):
        place = f"{path} {'row' if kind == 'csv' else 'record'} {number}"
        missing = [c for c in needed if row.get(c) is None]
        if missing:
            raise ValueError(
                f"{place}: missing column {missing[0]!r} (needs {list(needed)}); "
                f"columns present: {sorted(row)}"
            )
        where.append(place)
    ids, names = _label_ids([r[label_field] for r in rows], label_names, where)
    examples = []
    for row, label in zip(rows, ids, strict=True):
        example = {field: str(row[field]) for field in text_fields}
        example[label_field] = label
        if SPLIT_COLUMN in row:
            example[SPLIT_COLUMN] = str(row[SPLIT_COLUMN]).strip()
        examples.append(example)
    return tuple(examples), names


def _file_rows(kind, path, text_fields, label_field, label_names):
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{kind} dataset file {path!r} does not exist"
        ) from None
    return _parse_file(
        kind,
        path,
        (info.st_mtime_ns, info.st_size),
        tuple(text_fields),
        label_field,
        None if label_names is None else tuple(label_names),
    )


def file_split(
    rows: Sequence[dict[str, Any]],
    split: str,
    path: str,
    validation_fraction: float,
    seed: int,
) -> list[dict[str, Any]]:
    if any(SPLIT_COLUMN in row for row in rows):
        available = sorted({row.get(SPLIT_COLUMN, "") for row in rows})
        if split not in available:
            raise ValueError(
                f"Unknown split {split!r} for {path}; its {SPLIT_COLUMN!r} column "
                f"has {available}"
            )
        return [row for row in rows if row.get(SPLIT_COLUMN) == split]
    if split not in ("train", "validation"):
        raise ValueError(
            f"Unknown split {split!r} for {path}; a file without a "
            f"{SPLIT_COLUMN!r} column has splits ['train', 'validation']"
        )
    if not 0 < validation_fraction < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction}; expected 0 < fraction < 1"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    num_validation = max(1, round(validation_fraction * len(rows)))
    chosen = order[:num_validation] if split == "validation" else order[num_validation:]
    return [rows[i] for i in sorted(chosen)]


# --- TFDS names -----------------------------------------------------------------


def _tfds_label_names(info, name: str, label_field: str) -> list[str]:
    feature = info.features[label_field] if label_field in info.features else None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise ValueError(
            f"Dataset {name!r} has no class-label feature {label_field!r}; "
            f"features: {sorted(info.features)}"
        )
    return list(feature.names)


def _check_given_names(given, names, name):
    if given is not None and [str(n) for n in given] != names:
        raise ValueError(
            f"label_names={list(given)} differ from dataset {name!r}'s labels {names}"
        )


# --- public API -----------------------------------------------------------------


def load_labeled_source(
    name: str,
    split: str,
    *,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> LabeledSource:
    """`name`'s `split` as a `LabeledSource` (see module doc for names and files).

    `validation_fraction` and `seed` apply only to files without a split column.
    """
    if isinstance(text_fields, str):
        text_fields = (text_fields,)
    if not 1 <= len(text_fields) <= 2:
        raise ValueError(f"text_fields={text_fields}; expected one or two fields")
    file = file_of(name)
    if file is not None:
        kind, path = file
        rows, names = _file_rows(kind, path, text_fields, label_field, label_names)
        records = file_split(rows, split, path, validation_fraction, seed)
        return LabeledSource(
            records,
            label_names=names,
            text_fields=text_fields,
            label_field=label_field,
            description=f"{name!r}, split {split!r}",
        )
    info = sources.dataset_info(name, data_dir)
    names = _tfds_label_names(info, name, label_field)
    _check_given_names(label_names, names, name)
    missing = [f for f in text_fields if f not in info.features]
    if missing:
        raise ValueError(
            f"Dataset {name!r} has no text feature {missing[0]!r}; "
            f"features: {sorted(info.features)}"
        )
    return LabeledSource(
        sources.load_source(name, split, data_dir),
        label_names=names,
        text_fields=text_fields,
        label_field=label_field,
        description=f"{name!r}, split {split!r}",
    )


def split_names(
    name: str,
    *,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    data_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The splits `name` has: a file's split column values (or train and
    validation for a file without one), or the TFDS dataset's splits."""
    file = file_of(name)
    if file is None:
        return sorted(sources.dataset_info(name, data_dir).splits)
    kind, path = file
    rows, _ = _file_rows(kind, path, tuple(text_fields), label_field, None)
    if any(SPLIT_COLUMN in row for row in rows):
        return sorted({row.get(SPLIT_COLUMN, "") for row in rows})
    return ["train", "validation"]


def label_names(
    name: str,
    *,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The class names of `name`, in id order (`num_classes = len(...)`)."""
    file = file_of(name)
    if file is not None:
        kind, path = file
        text_fields = (text_fields,) if isinstance(text_fields, str) else text_fields
        return list(_file_rows(kind, path, text_fields, label_field, label_names)[1])
    names = _tfds_label_names(sources.dataset_info(name, data_dir), name, label_field)
    _check_given_names(label_names, names, name)
    return names


def take_subset(source: LabeledSource, n: int, seed: int) -> LabeledSource:
    """A deterministic subset of `n` examples with the classes' proportions.

    Class c gets n * count_c / len(source) examples, rounded by largest
    remainder, and at least one when n >= the number of present classes; the
    examples of a class are the first of a `seed`-shuffled order.
    """
    if not 0 < n <= len(source):
        raise ValueError(f"n={n}; expected 1 <= n <= len(source) = {len(source)}")
    labels = source.labels()
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    by_remainder = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for c in by_remainder:  # add the missing ones where rounding cut most
        if take.sum() >= n:
            break
        take[c] += 1
    while take.sum() > n:  # the "at least one" rule overshot: trim the largest
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng(seed)
    chosen = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.permutation(members)[:k].tolist())
    return LabeledSource(
        [source._records[i] for i in sorted(chosen)],
        label_names=source.label_names,
        text_fields=source.text_fields,
        label_field=source._label_field,
        description=f"{source._description}, {n} stratified (seed {seed})",
    )


# --- batches --------------------------------------------------------------------
