"""A user's own images as a dataset: `data.name=folder:DIR`.

Layouts (TFDS's ImageFolder and torchvision's ImageFolder):

    DIR/CLASS/*.png                 one split, "train"; labels = sorted CLASS names
    DIR/SPLIT/CLASS/*.jpg           splits named by their folders (train, test, ...)
    DIR/*.png  or  DIR/SPLIT/*.png  no class folders: unlabelled (pre-training)

PNG, JPEG, BMP, GIF and WebP files of any size and mode; records are
{"image": uint8 [H, W, C], "label": int} (no "label" when unlabelled),
decoded by Pillow when the pipeline reads them (the pipeline resizes). A split
name may take a slice, as TFDS's: "train[:90%]", "train[90%:]".
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

PREFIX = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_NAMES = ("train", "validation", "test")
T = TypeVar("T")


def _images(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_SUFFIXES)
    )


def _subdirs(directory: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(directory)
        if os.path.isdir(os.path.join(directory, d)) and not d.startswith(".")
    )


def select_split(
    splits: Mapping[str, Sequence[T]], split: str, dataset: str
) -> Sequence[T]:
    """The rows of `split`, a split name that may take a slice as TFDS's:
    "train[:90%]", "train[90%:]". `dataset` names the dataset in errors."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:\[(-?\d*)%?:(-?\d*)%?\])?\s*", split)
    if not match or match[1] not in splits:
        raise ValueError(
            f"Unknown split {split!r} for {dataset}; available splits: "
            f"{sorted(splits)} (optionally sliced: 'train[:90%]')"
        )
    rows = splits[match[1]]
    if match[2] or match[3]:
        start, stop = (
            None if not value else len(rows) * int(value) // 100
            for value in (match[2], match[3])
        )
        rows = rows[start:stop]
    return rows


def read_image(path: str) -> np.ndarray:
    """The image file decoded, uint8 [H, W, C]: grey (L) keeps one channel,
    RGB three; other modes (RGBA, P, CMYK, ...) become RGB."""
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image, np.uint8)
    return array if array.ndim == 3 else array[..., None]


@dataclasses.dataclass(frozen=True)
class FolderDataset:
    """The splits of an image folder: {split: [(path, label or -1)]}, and the
    class names (empty: unlabelled)."""

    root: str
    splits: dict[str, list[tuple[str, int]]]
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, root: str) -> FolderDataset:
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"folder:{root}: no such directory; expected DIR/CLASS/*.png, "
                "DIR/SPLIT/CLASS/*.png or a folder of images"
            )
        subdirs = _subdirs(root)
        split_dirs = [d for d in subdirs if d in SPLIT_NAMES]
        if split_dirs:
            if set(subdirs) - set(split_dirs):
                raise ValueError(
                    f"folder:{root} mixes split folders {split_dirs} with other "
                    f"folders {sorted(set(subdirs) - set(split_dirs))}; expected "
                    f"only {SPLIT_NAMES} or only class folders"
                )
            roots = {s: os.path.join(root, s) for s in split_dirs}
        else:
            roots = {"train": root}
        # Classes: the class folders of every split together.
        classes = sorted({c for r in roots.values() for c in _subdirs(r)})
        splits = {}
        for split, directory in roots.items():
            if classes:
                rows = [
                    (path, label)
                    for label, name in enumerate(classes)
                    if os.path.isdir(os.path.join(directory, name))
                    for path in _images(os.path.join(directory, name))
                ]
            else:
                rows = [(path, -1) for path in _images(directory)]
            if not rows:
                raise ValueError(
                    f"folder:{root}: split {split!r} ({directory}) holds no images "
                    f"(expected files ending in {IMAGE_SUFFIXES})"
                )
            splits[split] = rows
        return cls(root, splits, tuple(classes))

    def features(self) -> dict[str, Any]:
        features = {"image": tfds.features.Image(shape=(None, None, None))}
        if self.classes:
            features["label"] = tfds.features.ClassLabel(names=list(self.classes))
        return features

    def source(self, split: str) -> FolderSource:
        rows = select_split(self.splits, split, f"{PREFIX}{self.root}")
        return FolderSource(rows, labelled=bool(self.classes))


class FolderSource(Sequence):
    """Random access to a folder split's images, decoded on read."""

    def __init__(self, rows: list[tuple[str, int]], labelled: bool):
        self._rows, self._labelled = rows, labelled

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._rows[index]
        record = {"image": read_image(path)}
        if self._labelled:
            record["label"] = np.int64(label)
        return record


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What fmjax reads of a TFDS DatasetInfo: features and split names."""

    features: dict[str, Any]
    splits: tuple[str, ...]


def folder_dataset(name: str) -> FolderDataset:
    return FolderDataset.scan(os.path.expanduser(name[len(PREFIX) :]))
