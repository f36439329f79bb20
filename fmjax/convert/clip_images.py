"""CLIP's image preprocessing (transformers' CLIPImageProcessor) without
torchvision: Pillow resize of the uint8 image so its shortest edge is
`size["shortest_edge"]` (bicubic by default), centre crop to `crop_size`,
rescale by 1/255, normalise with image_mean / image_std. `preprocess_images`
gives the numbers HF's PIL backend gives; `fmjax.convert.clip` keeps the
settings in an import's config (`image_processor`) and writes them back as a
preprocessor_config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.errors import FormatError

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


def _height_width(size: Any, what: str) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, Mapping) and set(size) == {"height", "width"}:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise FormatError(
        f"preprocessor_config.json {what}={size!r}: expected an int or "
        f"{{height, width}}"
    )


def image_processor_from_hf(
    processor: Mapping[str, Any] | None, image_size: int | None = None
) -> dict[str, Any]:
    """CLIPImageProcessor's settings from a preprocessor_config.json dict
    (None or absent keys: its defaults, at `image_size` when given, else 224),
    in HF's names with canonical values: do_resize, size ({"shortest_edge": n}
    or {"height", "width"}), resample (a PIL filter number), do_center_crop,
    crop_size {"height", "width"}, do_rescale, rescale_factor, do_normalize,
    image_mean, image_std, do_convert_rgb. Idempotent. With `image_size`,
    settings whose output is not image_size x image_size are refused (HF's
    model would reject those pixels too)."""
    side = image_size or 224
    out = dict(
        do_resize=True,
        size={"shortest_edge": side},
        resample=PIL_BICUBIC,
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    processor = dict(processor or {})
    out.update({k: processor[k] for k in out if processor.get(k) is not None})
    size = out["size"]
    if isinstance(size, int):  # CLIP resizes an int size's shortest edge
        size = {"shortest_edge": size}
    if not (isinstance(size, Mapping) and set(size) == {"shortest_edge"}):
        size = _height_width(size, "size")
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        out[key] = bool(out[key])
    out.update(
        size={k: int(v) for k, v in size.items()},
        crop_size=_height_width(out["crop_size"], "crop_size"),
        resample=int(out["resample"]),
        rescale_factor=float(out["rescale_factor"]),
        image_mean=[float(v) for v in np.atleast_1d(out["image_mean"])],
        image_std=[float(v) for v in np.atleast_1d(out["image_std"])],
        do_convert_rgb=bool(out["do_convert_rgb"]),
    )
    output = out["crop_size"] if out["do_center_crop"] else out["size"]
    if not (out["do_center_crop"] or out["do_resize"] and "height" in output):
        output = "the input's size"
    if image_size and output != {"height": image_size, "width": image_size}:
        raise FormatError(
            f"preprocessor_config.json makes images of {output} (do_resize="
            f"{out['do_resize']}, do_center_crop={out['do_center_crop']}); the "
            f"model takes {image_size} x {image_size}"
        )
    return out


def hf_image_processor(processor: Mapping[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json (CLIPImageProcessor) of `processor`."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        **image_processor_from_hf(processor),
    }


def _resized_shape(height: int, width: int, size: Mapping[str, int]) -> tuple:
    """(height, width) after CLIP's resize: the shortest edge to
    size["shortest_edge"], the other int(edge * long / short)."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    new_short = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(new_short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(x_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF's centre crop: top-left at (size - crop) // 2; an image smaller than
    the crop is first centred on zeros (ceil of half the padding before)."""
    rows, cols = x_HWC.shape[:2]
    pad_top, pad_left = -(-max(height - rows, 0) // 2), -(-max(width - cols, 0) // 2)
    if pad_top or pad_left:
        padded = np.zeros(
            (max(rows, height), max(cols, width), x_HWC.shape[2]), x_HWC.dtype
        )
        padded[pad_top : pad_top + rows, pad_left : pad_left + cols] = x_HWC
        x_HWC = padded
    top = pad_top + (rows - height) // 2
    left = pad_left + (cols - width) // 2
    return x_HWC[max(top, 0) : top + height, max(left, 0) : left + width]


def _to_rgb(image):
    """RGB of a PIL image, transparency composited onto white (as HF does)."""
    from PIL import Image

    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def preprocess_images(images, processor: Mapping[str, Any] | None) -> np.ndarray:
    """float32 [N, H, W, C] model inputs of images as CLIP's image processor
    (transformers' CLIPImageProcessor, PIL backend) makes them: to RGB
    (transparency on white), Pillow
    resize of the uint8 image (shortest edge, `resample`), centre crop,
    times rescale_factor (float64, then float32), (x - mean) / std in float32.
    `images`: uint8 arrays [H, W, C] or [H, W] (sizes may differ) or PIL
    images; `processor`: a preprocessor_config.json dict or
    `image_processor_from_hf`'s."""
    from PIL import Image

    p = image_processor_from_hf(processor)
    mean = np.asarray(p["image_mean"], np.float32)
    std = np.asarray(p["image_std"], np.float32)
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise ValueError(
                    f"image of dtype {image.dtype}: expected uint8 pixels (0..255) "
                    "or a PIL image"
                )
            grey = image.ndim == 3 and image.shape[-1] == 1
            image = Image.fromarray(image[..., 0] if grey else image)
        if p["do_convert_rgb"]:
            image = _to_rgb(image)
        if p["do_resize"]:
            height, width = _resized_shape(image.height, image.width, p["size"])
            image = image.resize((width, height), Image.Resampling(p["resample"]))
        x = np.asarray(image)
        x = x[..., None] if x.ndim == 2 else x
        if p["do_center_crop"]:
            x = _center_crop(x, p["crop_size"]["height"], p["crop_size"]["width"])
        if p["do_rescale"]:
            x = (x.astype(np.float64) * p["rescale_factor"]).astype(np.float32)
        if p["do_normalize"]:
            x = (x.astype(np.float32) - mean) / std
        out.append(np.asarray(x, np.float32))
    if not out:
        crop = p["crop_size"]
        return np.zeros((0, crop["height"], crop["width"], 3), np.float32)
    return np.stack(out)
