"""Export trained params to safetensors (+ model config + tokenizer) and read back.

Layout of WORKDIR/export/: `model.safetensors` (flat names like
`layers_0.attention.query.kernel`), `config.json` (the run's config), and
`tokenizer.model`. Only safetensors and JSON are read: nothing from a file runs.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save

from fmjax import storage
from fmjax.config import to_json
from fmjax.errors import FormatError

EXPORT_DIR = "export"
MODEL_WEIGHTS = "model.safetensors"
# An adapter run exports only its trained params (adapter + task head); its
# config's init.model names the base they go on.
ADAPTER_WEIGHTS = "adapter.safetensors"


def flatten_params(params) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
    # order="C" rather than np.ascontiguousarray, which makes a 0-d param
    # (a DualEncoder's logit_scale) 1-d.
    return {key: np.asarray(value, order="C") for key, value in flat.items()}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(flat, sep=".")


def export(
    workdir: str, params, config, tokenizer, weights: str = MODEL_WEIGHTS
) -> str:
    """Writes WORKDIR/export/ on process 0; returns its path."""
    out = storage.join(workdir, EXPORT_DIR)
    if jax.process_index() != 0:
        return out
    storage.makedirs(out)
    storage.write_bytes(storage.join(out, weights), save(flatten_params(params)))
    storage.write_text(storage.join(out, "config.json"), to_json(config))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def refuse_pickles(directory: str) -> None:
    """Raises if `directory` holds pickled weights (and no safetensors were found):
    unpickling can run code, so fmjax never does it and says how to convert."""
    if not os.path.isdir(directory):
        return
    pickled = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        path = os.path.join(directory, pickled[0])
        raise FormatError(
            f"{path} is a pickle, which can run code when loaded; fmjax reads "
            f"safetensors only. Convert it first where you trust the file, e.g. in "
            f"Python: `from safetensors.torch import save_file; save_file("
            f"torch.load(path, weights_only=True), 'model.safetensors')`, or for an "
            f"HF model directory `transformers.AutoModel.from_pretrained(dir)"
            f".save_pretrained(out_dir)` (writes model.safetensors)"
        )


def find_export(path: str) -> str:
    """The export directory for a workdir or an export directory itself."""
    for candidate in (path, os.path.join(path, EXPORT_DIR)):
        for weights in (MODEL_WEIGHTS, ADAPTER_WEIGHTS):
            if os.path.isfile(os.path.join(candidate, weights)):
                return candidate
    refuse_pickles(path)
    raise FileNotFoundError(
        f"no fmjax export in {path!r}: expected {path}/model.safetensors or "
        f"{path}/{EXPORT_DIR}/model.safetensors (written at the end of `fmjax train`)"
    )


def is_adapter_export(path: str) -> bool:
    """True for the export of an adapter run (trained params only, no base)."""
    return os.path.isfile(os.path.join(find_export(path), ADAPTER_WEIGHTS))


def load_export(path: str) -> tuple[dict, dict]:
    """(params, config dict) from an export directory; for an adapter export the
    params are the trained ones ({"model": head, <method>: adapter})."""
    directory = find_export(path)
    weights = ADAPTER_WEIGHTS if is_adapter_export(directory) else MODEL_WEIGHTS
    params = unflatten_params(load_file(os.path.join(directory, weights)))
    return params, load_export_config(directory)


def load_export_config(path: str) -> dict:
    """The run config saved beside an export's weights (no weights are read)."""
    with open(os.path.join(find_export(path), "config.json")) as f:
        return json.load(f)
