"""grain pipelines of images: source -> decode -> augment -> batches.

    it = make_image_iterator(source, image_size=28, channels=1, batch_size=64,
                             seed=0, augment=("random_resized_crop", "flip"))

Batches are dicts of numpy arrays:
  images   float32 [B, H, W, C]  in [0, 1], then (x - mean) / std per channel
  labels   int32 [B]             -1 where the source has no labels
  weights  float32 [B]           1 for real rows, 0 for rows padding an eval batch

Self-supervised tasks ask for several views per image instead (`views`: a
group per batch key, e.g. SimCLR's `views` [B, 2, H, W, C] or DINO's
multi-crop, `global_views` [B, 2, H, W, C] and `local_views` [B, N, h, w, C]).

Augmentations are ops in a small registry (`OPS`), named in config as strings:
"flip", "random_resized_crop(scale=0.35)", "jitter(brightness=0.4,
contrast=0.4)". Each example draws from its own generator (grain's
`random_map`, seeded from the pipeline seed and the example's position), so a
pipeline is deterministic and resumes exactly from `get_state()`.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from fmjax.data.sharded import shard_read_options

BATCH_KEYS = ("images", "labels", "weights")


# --- ops: (image float32 [H, W, C] in [0, 1], rng, **kwargs) -> image ---------------


def _resize(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a [0, 1] image to size x size."""
    if image_HWC.shape[:2] == (size, size):
        return image_HWC
    channels = [
        np.asarray(
            Image.fromarray(image_HWC[..., c]).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(image_HWC.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def random_resized_crop(
    image_HWC, rng, *, size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)
):
    """A random crop of `scale` of the area and `ratio` aspect, resized to
    `size` (torchvision's RandomResizedCrop; the whole image after 10 misses)."""
    height, width = image_HWC.shape[:2]
    scale = (scale, 1.0) if np.isscalar(scale) else tuple(scale)
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize(image_HWC[top : top + h, left : left + w], size)
    return _resize(image_HWC, size)


def flip(image_HWC, rng, *, size, p=0.5):
    del size
    return image_HWC[:, ::-1] if rng.uniform() < p else image_HWC


def jitter(image_HWC, rng, *, size, brightness=0.4, contrast=0.4, p=0.8):
    """Brightness and contrast scaled by factors in [1 - x, 1 + x], with
    probability p (SimCLR's colour jitter without hue, which grey images lack)."""
    del size
    if rng.uniform() >= p:
        return image_HWC
    image_HWC = image_HWC * rng.uniform(1 - brightness, 1 + brightness)
    mean = image_HWC.mean()
    image_HWC = (image_HWC - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    return np.clip(image_HWC, 0.0, 1.0).astype(np.float32)


def gray_to_rgb(image_HWC, rng, *, size):
    del rng, size
    return np.repeat(image_HWC, 3, axis=-1) if image_HWC.shape[-1] == 1 else image_HWC


def blur(image_HWC, rng, *, size, sigma=(0.1, 2.0), p=0.5):
    """Gaussian blur with a random sigma in pixels, with probability p."""
    del size
    if rng.uniform() >= p:
        return image_HWC
    std = float(rng.uniform(*sigma))
    half = max(1, int(np.ceil(3 * std)))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / std) ** 2)
    taps /= taps.sum()
    out = image_HWC.astype(np.float32)
    for axis in (0, 1):  # separable: rows, then columns (edges repeated)
        pad = [(half, half) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(out, pad, mode="edge")
        out = sum(
            w * np.take(padded, range(i, i + out.shape[axis]), axis=axis)
            for i, w in enumerate(taps)
        )
    return out.astype(np.float32)


def solarize(image_HWC, rng, *, size, threshold=0.5, p=0.2):
    """Pixels above `threshold` inverted, with probability p (BYOL/DINO)."""
    del size
    if rng.uniform() >= p:
        return image_HWC
    return np.where(image_HWC >= threshold, 1.0 - image_HWC, image_HWC).astype(
        np.float32
    )


def resize(image_HWC, rng, *, size):
    del rng
    return _resize(image_HWC, size)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "random_resized_crop": random_resized_crop,
    "flip": flip,
    "jitter": jitter,
    "gray_to_rgb": gray_to_rgb,
    "blur": blur,
    "solarize": solarize,
    "resize": resize,
}


def parse_op(spec: str) -> tuple[str, dict[str, Any]]:
    """ "name" or "name(key=value, ...)" (values as Python literals)."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", spec)
    if not match or match[1] not in OPS:
        raise ValueError(
            f"augmentation {spec!r}: expected one of {sorted(OPS)}, optionally "
            "with (key=value, ...)"
        )
    kwargs = {}
    if match[2]:
        call = ast.parse(f"f({match[2]})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError(f"augmentation {spec!r}: arguments must be key=value")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return match[1], kwargs


class Augment(grain.transforms.RandomMap):
    """decode -> [0, 1] float -> the ops in order -> resize to `size` ->
    normalise; one example's rng draws every random choice."""

    def __init__(
        self,
        ops: Sequence[str],
        size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self._ops = [parse_op(spec) for spec in ops]
        self._size, self._channels = size, channels
        self._mean = np.asarray(mean, np.float32)
        self._std = np.asarray(std, np.float32)

    def view(self, image, rng: np.random.Generator) -> np.ndarray:
        image_HWC = to_float(image, self._channels)
        for name, kwargs in self._ops:
            image_HWC = OPS[name](image_HWC, rng, size=self._size, **kwargs)
        image_HWC = _resize(image_HWC, self._size)
        return ((image_HWC - self._mean) / self._std).astype(np.float32)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict:
        return {
            "images": self.view(example["image"], rng),
            "labels": np.int32(example.get("label", -1)),
            "weights": np.float32(1.0),
        }


def to_float(image, channels: int) -> np.ndarray:
    """float32 [H, W, channels] in [0, 1] of a uint8 image [H, W] / [H, W, C]
    (grey images gain channels by repetition; RGBA loses alpha)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[-1] != channels:
        if image.shape[-1] == 1:
            image = np.repeat(image, channels, axis=-1)
        elif channels == 1:
            image = image.mean(axis=-1, keepdims=True)
        else:
            raise ValueError(
                f"image with {image.shape[-1]} channels; expected 1, 3 or {channels}"
            )
    return (image.astype(np.float32) / 255.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ViewGroup:
    """`count` views of each image at `size` x `size` (0: the model's size),
    each augmented independently by `augment`."""

    count: int
    size: int = 0
    augment: tuple[str, ...] = ()


def parse_views(views: Mapping[str, Mapping[str, Any]]) -> dict[str, ViewGroup]:
    """Config `data.views` ({batch key: {count, size, augment}}) as ViewGroups,
    checked (a bad op or count names itself)."""
    groups = {}
    for key, spec in views.items():
        unknown = sorted(set(spec) - {"count", "size", "augment"})
        if unknown:
            raise ValueError(
                f"data.views.{key}: unknown keys {unknown}; expected count, size, "
                "augment"
            )
        group = ViewGroup(
            int(spec.get("count", 1)),
            int(spec.get("size", 0)),
            tuple(spec.get("augment", ())),
        )
        if group.count < 1 or group.size < 0:
            raise ValueError(
                f"data.views.{key}: count={group.count}, size={group.size}; expected "
                "count >= 1 and size >= 0 (0: the model's image_size)"
            )
        for op in group.augment:
            parse_op(op)
        groups[key] = group
    return groups


class MultiView(grain.transforms.RandomMap):
    """Several augmented views of each image, in groups (SimCLR: one group of 2
    views; DINO's multi-crop: 2 global crops at the model's size and N local
    ones, smaller): batch key -> [count, size, size, C] per example."""

    def __init__(self, groups: Mapping[str, ViewGroup], size: int, channels, mean, std):
        self._groups = {
            key: (g.count, Augment(g.augment, g.size or size, channels, mean, std))
            for key, g in groups.items()
        }

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict:
        out = {
            key: np.stack([augment.view(example["image"], rng) for _ in range(count)])
            for key, (count, augment) in self._groups.items()
        }
        out["labels"] = np.int32(example.get("label", -1))
        out["weights"] = np.float32(1.0)
        return out


class WithText(grain.transforms.RandomMap):
    """An augmented image and, from `text_fn(example, rng)`, text fields
    (image-text pairs: a caption drawn and tokenized)."""

    def __init__(self, augment: Augment, text_fn):
        self._augment, self._text_fn = augment, text_fn

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict:
        out = self._augment.random_map(example, rng)
        out.update(self._text_fn(example, rng))
        return out


class _PadBatch(grain.transforms.Map):
    """A short last eval batch padded with weight-0 rows."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pad = self._batch_size - len(batch["weights"])
        if pad <= 0:
            return batch
        return {
            k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()
        }


def make_image_iterator(
    source: Sequence[dict[str, Any]],
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    seed: int,
    augment: Sequence[str] = (),
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    views: Mapping[str, ViewGroup] | None = None,
    text_fn=None,
) -> grain.DatasetIterator:
    """Batches of this process's slice of `source` (examples i, i + n, ...),
    reshuffled every epoch from `seed`, each example augmented by `augment`
    with its own random draws (or, with `views`, several views per example
    in groups keyed as in the batch; with `text_fn`, text fields beside one
    view). With `drop_remainder=False` a short last batch is padded with
    weight-0 rows."""
    if len(source) <= process_index:
        raise ValueError(
            f"the source has {len(source)} examples, too few for process "
            f"{process_index} of {process_count}"
        )
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"data.{name}={tuple(values)}: expected 1 or {channels} values (one "
                f"per channel of the model's {channels}-channel images)"
            )
    mean = tuple(mean) * (channels if len(mean) == 1 else 1)
    std = tuple(std) * (channels if len(std) == 1 else 1)
    if views:
        transform = MultiView(views, image_size, channels, mean, std)
    else:
        transform = Augment(augment, image_size, channels, mean, std)
        if text_fn is not None:
            transform = WithText(transform, text_fn)
    examples = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        examples = examples.shuffle(seed=seed)
    if repeat:
        examples = examples.repeat()
    rows = examples.random_map(transform, seed=seed).to_iter_dataset(
        shard_read_options(batch_size)
    )
    batches = rows.batch(batch_size, drop_remainder=drop_remainder)
    return iter(batches.map(_PadBatch(batch_size)))
