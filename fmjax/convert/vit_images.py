"""ViT's image preprocessing (transformers' ViTImageProcessor) without
torchvision: Pillow resize of the uint8 image to the model's square size,
rescale, normalise, read from and written back as preprocessor_config.json.
`fmjax.convert.vit` keeps the settings in an import's config
(`image_processor`); `fmjax.convert.clip_images` is CLIP's counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.errors import FormatError

# ViTImageProcessor's defaults (transformers), used without preprocessor_config.json.
DEFAULT_PROCESSOR = dict(
    do_resize=True,
    resample=2,  # PIL bilinear
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
)


def image_processor_from_hf(
    processor: Mapping[str, Any] | None, image_size: int
) -> dict[str, Any]:
    """The preprocessing fields of an HF preprocessor_config.json dict (None:
    ViTImageProcessor's defaults at the model's `image_size`, which is 224 for
    the standard ViTs): do_resize, size [height, width], resample (a PIL
    filter number), do_rescale, rescale_factor, do_normalize, image_mean,
    image_std. A resize to other than the model's square size, or a centre
    crop, is refused (HF's model would reject those pixels too)."""
    out = {**DEFAULT_PROCESSOR, "size": [image_size, image_size]}
    processor = dict(processor or {})
    if processor.get("do_center_crop"):
        raise FormatError("preprocessor_config.json: do_center_crop is not supported")
    out.update({k: processor[k] for k in DEFAULT_PROCESSOR if k in processor})
    size = processor.get("size", out["size"])
    if isinstance(size, Mapping):
        size = [size.get("height"), size.get("width")]
    elif isinstance(size, int):
        size = [size, size]
    if out["do_resize"] and list(size) != [image_size, image_size]:
        raise FormatError(
            f"preprocessor_config.json resizes to size={processor.get('size')!r}; "
            f"fmjax supports a {{height, width}} equal to the model's image_size="
            f"{image_size}"
        )
    out.update(
        size=[image_size, image_size],
        resample=int(out["resample"]),
        image_mean=[float(v) for v in np.atleast_1d(out["image_mean"])],
        image_std=[float(v) for v in np.atleast_1d(out["image_std"])],
    )
    return out


def hf_image_processor(processor: Mapping[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json (ViTImageProcessor) of `image_processor_from_hf`
    fields."""
    height, width = processor["size"]
    return {
        "image_processor_type": "ViTImageProcessor",
        **{k: processor[k] for k in DEFAULT_PROCESSOR},
        "size": {"height": int(height), "width": int(width)},
        "image_mean": list(processor["image_mean"]),
        "image_std": list(processor["image_std"]),
    }


def preprocess_images(
    images, processor: Mapping[str, Any], channels: int
) -> np.ndarray:
    """float32 [N, H, W, channels] model inputs of uint8 images ([N, H, W, C] or
    grey [N, H, W]) as HF's ViTImageProcessor makes them: Pillow resize of the
    uint8 image with `resample`, times rescale_factor, then (x - mean) / std."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: HF image preprocessing is grey or RGB")
    height, width = processor["size"]
    mean = np.resize(np.asarray(processor["image_mean"], np.float64), channels)
    std = np.resize(np.asarray(processor["image_std"], np.float64), channels)
    out = []
    for image in images:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        pil = Image.fromarray(image).convert("RGB" if channels == 3 else "L")
        if processor["do_resize"]:
            pil = pil.resize((width, height), Image.Resampling(processor["resample"]))
        x = np.asarray(pil, np.float64).reshape(pil.height, pil.width, channels)
        if processor["do_rescale"]:
            x = x * processor["rescale_factor"]
        if processor["do_normalize"]:
            x = (x - mean) / std
        out.append(x.astype(np.float32))
    return np.stack(out) if out else np.zeros((0, height, width, channels), np.float32)
