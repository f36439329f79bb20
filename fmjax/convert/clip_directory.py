"""HF CLIP directories read and written (`fmjax.convert.clip` holds the
config, tensor-name and layout mapping): `load_hf_clip(dir)` gives a
DualEncoder's config, params, CLIP's tokenizer and image preprocessing;
`save_hf_clip` writes a run's DualEncoder as an HF `CLIPModel` directory."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from flax import traverse_util

from fmjax import storage
from fmjax.convert import hf
from fmjax.convert.clip import (
    _towers,
    hf_config_from_model,
    hf_from_params,
    model_config_from_hf,
    params_from_hf,
)
from fmjax.convert.clip_images import hf_image_processor, image_processor_from_hf
from fmjax.data.bpe import CLIPBPETokenizer
from fmjax.data.tokenizer import Tokenizer
from fmjax.errors import FormatError


def _read_processor(directory: str, image_size: int) -> dict[str, Any]:
    path = os.path.join(directory, hf.PREPROCESSOR_FILENAME)
    processor = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            processor = json.load(f)
    return image_processor_from_hf(processor, image_size)


def _check_tokenizer(tokenizer, model: Mapping[str, Any], where: str) -> None:
    """Refuses a tokenizer that is not CLIP's or has more ids than the text
    tower."""
    if not isinstance(tokenizer, CLIPBPETokenizer):
        raise FormatError(
            f"{where}: {tokenizer!r} is not CLIP's BPE tokenizer; HF CLIP needs "
            f"one (tokenizer.json with `</w>` word ends)"
        )
    vocab = model["text"]["vocab_size"]
    if tokenizer.vocab_size > vocab:
        raise FormatError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens, more than the "
            f"text tower's vocab_size={vocab}"
        )


def load_hf_clip(
    directory: str | os.PathLike,
) -> tuple[dict, dict, CLIPBPETokenizer, dict]:
    """(model config dict, params, tokenizer, image processor) of an HF CLIP
    directory: a DualEncoder config, a nested dict of float32 NumPy params in
    its layout, CLIP's tokenizer (bos + `encode(text)` + eos, as
    `fmjax.data.captions.encode_captions` makes them, are HF's ids), and
    `image_processor_from_hf` of its preprocessor_config.json (for
    `preprocess_images`). A config fmjax cannot compute, a missing tensor or
    one that maps nowhere raises FormatError naming it."""
    directory = os.fspath(directory)
    hf_config = hf._read_hf_config(directory)
    model = model_config_from_hf(hf_config)  # refuse before reading weights
    processor = _read_processor(directory, model["image"]["image_size"])
    tokenizer = CLIPBPETokenizer.load(directory)
    _check_tokenizer(tokenizer, model, directory)
    eos = _towers(hf_config)[0].get("eos_token_id")
    # eos_token_id 2 (old configs): HF pools the largest id, CLIP's eos.
    pooled = tokenizer.vocab_size - 1 if eos == 2 else eos
    if eos is not None and pooled != tokenizer.eos_id:
        raise FormatError(
            f"{directory}: HF CLIP pools the text at eos_token_id={eos} (2: the "
            f"largest id), but the tokenizer's eos is {tokenizer.eos_id}"
        )
    shapes = hf._param_shapes(model)
    num_in = {path: hf._num_in(model, path) for path in shapes}
    source = f"{directory}/{hf.WEIGHTS_FILENAME}"
    flat = params_from_hf(hf.read_hf_weights(directory), shapes, model, num_in, source)
    return model, traverse_util.unflatten_dict(flat), tokenizer, processor


def config_fields(directory: str, model: Mapping[str, Any]) -> dict[str, Any]:
    """The fmjax config groups of an imported CLIP beside `model`:
    `image_processor` (`image_processor_from_hf` of its
    preprocessor_config.json) and data.mean / data.std."""
    processor = _read_processor(directory, model["image"]["image_size"])
    data = {"mean": processor["image_mean"], "std": processor["image_std"]}
    return {"image_processor": processor, "data": data}


def save_hf_clip(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    params,
    tokenizer: Tokenizer,
) -> str:
    """Writes an HF CLIPModel directory (config.json, model.safetensors in
    float32, preprocessor_config.json, the tokenizer's files) of a fmjax run's
    DualEncoder: its `config` gives the model and the preprocessing (an
    import's image_processor, else CLIP's at the model's size with data.mean /
    data.std when set). Returns `directory`."""
    directory = os.fspath(directory)
    model = dict(config["model"])
    hf_config = hf_config_from_model(model, tokenizer)
    _check_tokenizer(tokenizer, model, "fmjax-to-hf")
    image_size = model["image"]["image_size"]
    processor = config.get("image_processor")
    if not processor:
        data = dict(config.get("data") or {})
        stats = {"image_mean": data.get("mean"), "image_std": data.get("std")}
        processor = {k: v for k, v in stats.items() if v}
    processor = image_processor_from_hf(processor, image_size)
    expected, flat = hf._flat_matching_params(model, params)
    num_in = {path: hf._num_in(model, path) for path in expected}
    tensors = hf_from_params(flat, model, num_in)
    hf._write_hf_directory(directory, hf_config, tensors, tokenizer)
    storage.write_text(
        storage.join(directory, hf.PREPROCESSOR_FILENAME),
        json.dumps(hf_image_processor(processor), indent=2, sort_keys=True) + "\n",
    )
    return directory
