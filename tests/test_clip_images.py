"""CLIP's image preprocessing (`fmjax.convert.clip_images`) gives the pixels
transformers' CLIPImageProcessor (PIL backend) gives, and CLIP's steps done
by hand: shortest-edge bicubic resize, centre crop, rescale, normalise; grey
and RGBA inputs; a crop larger than the resized image."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_clip_hf import PREPROCESSOR, _max_diff  # noqa: E402

from fmjax.convert import clip, clip_images  # noqa: E402


def _reference_pixels(image: np.ndarray, shortest: int, crop: int) -> np.ndarray:
    """CLIP's steps by hand: PIL bicubic resize of the shortest edge to
    `shortest` (the long edge truncated), centre crop, /255, normalise."""
    from PIL import Image

    height, width = image.shape[:2]
    if width <= height:
        size = (shortest, int(shortest * height / width))
    else:
        size = (int(shortest * width / height), shortest)
    resized = np.asarray(Image.fromarray(image).convert("RGB").resize(size, 3))
    top = (resized.shape[0] - crop) // 2
    left = (resized.shape[1] - crop) // 2
    x = resized[top : top + crop, left : left + crop] / 255.0
    return (x - np.asarray(clip_images.CLIP_MEAN)) / np.asarray(clip_images.CLIP_STD)


def test_preprocess_images_as_clip_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil,
    )

    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, (37, 53, 3), np.uint8),
        rng.integers(0, 256, (91, 29, 3), np.uint8),
        rng.integers(0, 256, (40, 40), np.uint8),  # grey: made RGB
        rng.integers(0, 256, (30, 45, 4), np.uint8),  # RGBA: on white
    ]
    processor = dict(PREPROCESSOR, size={"shortest_edge": 24}, crop_size=20)
    hf_processor = CLIPImageProcessorPil(**processor)
    diffs = {"hand": 0.0, "HF": 0.0}
    for image in images:
        got = clip.preprocess_images([image], processor)
        assert got.shape == (1, 20, 20, 3) and got.dtype == np.float32
        if image.ndim == 2:
            rgb = np.repeat(image[..., None], 3, axis=-1)
        else:  # alpha a in [0, 1]: a * rgb + (1 - a) * white, rounded
            alpha = image[..., 3:] / 255.0 if image.shape[-1] == 4 else 1.0
            rgb = image[..., :3] * alpha + 255 * (1 - alpha)
            rgb = np.round(rgb).astype(np.uint8)
        hand = _max_diff(got[0], _reference_pixels(rgb, 24, 20))
        # HF reads grey or RGBA arrays as ambiguous: give it the PIL image.
        hf_input = image if image.shape[-1:] == (3,) else Image.fromarray(image)
        want = hf_processor(hf_input, return_tensors="np")["pixel_values"]
        diffs["hand"] = max(diffs["hand"], hand)
        diffs["HF"] = max(diffs["HF"], _max_diff(got, want.transpose(0, 2, 3, 1)))
    # A crop larger than the resized image: HF centres it on zeros.
    padded = dict(processor, size={"shortest_edge": 16}, crop_size=21)
    want = CLIPImageProcessorPil(**padded)(images[0], return_tensors="np")
    got = clip.preprocess_images(images[:1], padded)
    diffs["HF, padded"] = _max_diff(got, want["pixel_values"].transpose(0, 2, 3, 1))
    print(f"preprocess_images: max |fmjax - ...| {diffs}")
    assert diffs["hand"] <= 1e-5 and max(diffs["HF"], diffs["HF, padded"]) <= 1e-6
