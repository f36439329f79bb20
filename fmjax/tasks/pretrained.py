"""`init.model`: start a run from a pretrained model (an fmjax workdir or export,
or an HF directory) instead of random weights.

The architecture comes from the pretrained model; `config.model` may set only
the keys a task lists as settable (dropout, dtype, remat, a classifier head).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from fmjax.config import ConfigError
from fmjax.models.registry import model_config as parse_model_config

# config.model keys any run may set over a pretrained model's.
NUMERICS = (
    "dropout_rate",
    "attention_dropout_rate",
    "dtype",
    "remat",
    "max_logits_elements",
    "max_attention_elements",
)


def init_model_path(config) -> str:
    """`init.model` (`init.from` is the same key)."""
    init = config.get("init", {})
    return os.path.expanduser(init.get("model", "") or "")


def load_pretrained(path: str) -> tuple[dict, dict, Any]:
    """(model config dict with `kind`, params as numpy, tokenizer) of an HF BERT,
    GPT-2, ViT or CLIP directory or an fmjax workdir / export (a ViT has no
    tokenizer: None)."""
    from fmjax.convert import hf
    from fmjax.data.tokenizer import load_tokenizer
    from fmjax.export import find_export, is_adapter_export, load_export

    if not os.path.exists(path):
        raise ConfigError(f"init.model={path!r} does not exist")
    try:
        if hf.is_hf_directory(path):
            model_config, params, tokenizer = hf.load_hf_model(path)
            return dict(model_config), params, tokenizer
        if is_adapter_export(path):
            raise ConfigError(
                f"init.model={path!r} holds an adapter, not a whole model; merge it "
                "first (fmjax.load(path).save_merged(dir)) or start from its base"
            )
        params, config = load_export(path)
        images = config["model"].get("kind") in ("vit", "vit_mae")  # no tokenizer
        tokenizer = None if images else load_tokenizer(find_export(path))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init.model={path!r}: {e}") from None
    return dict(config["model"]), params, tokenizer


def resolve_model_config(
    pretrained: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    kind: str,
    settable: Sequence[str],
    fixed: Mapping[str, Any] = (),
    strict: bool = True,
):
    """The run's model config: the pretrained architecture (which must be of
    `kind`), then `fixed` values, then the `settable` keys of `overrides`.
    `strict`: any other key of `overrides` must equal the architecture's (a
    saved run repeats it); otherwise such keys are ignored, the architecture
    being the pretrained model's."""
    if pretrained.get("kind") != kind:
        raise ConfigError(
            f"init.model is a {pretrained.get('kind')!r} model; this objective "
            f"trains model.kind={kind!r}"
        )
    arch = {**parse_model_config(pretrained).to_dict(), **dict(fixed)}
    if strict:
        unknown = sorted(
            k
            for k, v in overrides.items()
            if k not in settable and arch.get(k, object()) != v
        )
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]}={overrides[unknown[0]]!r} cannot be set: the "
                f"architecture comes from init.model ({unknown[0]}="
                f"{arch.get(unknown[0])!r}); settable: {list(settable)}"
            )
    arch.update({k: v for k, v in overrides.items() if k in settable})
    try:
        return parse_model_config(arch)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def overlay_pretrained(params, pretrained, new_prefixes: Sequence[str] = ()) -> dict:
    """`params` (a fresh init) with every param that `pretrained` has replaced.
    Pretrained params the model lacks (an MLM head under a classifier) are
    dropped; a shape mismatch, or a param outside `new_prefixes` (e.g. a new
    classifier head) that the checkpoint lacks, raises."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    given = flax.traverse_util.flatten_dict(pretrained, sep="/")
    missing = [
        p
        for p in flat
        if p not in given and not any(p.startswith(n) for n in new_prefixes)
    ]
    if missing:
        raise ValueError(f"init.model lacks params {missing[:5]}")
    for path, value in given.items():
        if path not in flat:
            continue
        if tuple(np.shape(value)) != tuple(flat[path].shape):
            raise ValueError(
                f"init.model param {path} has shape {np.shape(value)}; the model "
                f"expects {tuple(flat[path].shape)}"
            )
        flat[path] = jax.numpy.asarray(value, flat[path].dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")
