"""The one map from a model `kind` to its config dataclass and flax module.

    cfg = model_config({"kind": "decoder", "d_model": 128, ...})  # validated
    module = build_model(cfg)                  # or build_model(a dict / ConfigDict)
    axes = param_axes(cfg)                     # {"layers_0/mlp/up/kernel": names}

A config dataclass carries its own `kind`, so `to_dict()` is what a run's
config.json holds and `model_config(d)` reads it back. A new model family adds
one entry to `MODEL_KINDS` (its config class, its module, and example inputs
that trace `init`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from fmjax.models.axes import abstract_params, axes_of
from fmjax.models.config import TransformerConfig
from fmjax.models.multimodal import DualEncoderConfig
from fmjax.models.vision import ViTConfig


def _token_inputs(cfg, rows: int) -> tuple[tuple, dict]:
    tokens = jnp.zeros((rows, 8), jnp.int32)
    return (tokens,), {}


def _image_inputs(cfg, rows: int) -> tuple[tuple, dict]:
    shape = (rows, cfg.image_size, cfg.image_size, cfg.channels)
    return (jnp.zeros(shape, jnp.float32),), {}


def _masked_image_inputs(cfg, rows: int) -> tuple[tuple, dict]:
    (images,), _ = _image_inputs(cfg, rows)
    return (images,), {"noise_BP": jnp.zeros((rows, cfg.num_patches), jnp.float32)}


def _image_text_inputs(cfg, rows: int) -> tuple[tuple, dict]:
    (images,), _ = _image_inputs(cfg.image, rows)
    (tokens,), _ = _token_inputs(cfg.text, rows)
    return (images, tokens), {}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    config_class: type
    module: str  # "package.module:Class", imported when first built
    example_inputs: Callable[[Any, int], tuple[tuple, dict]]

    def module_class(self):
        name, _, attr = self.module.partition(":")
        return getattr(importlib.import_module(name), attr)


MODEL_KINDS: dict[str, ModelKind] = {
    "encoder": ModelKind(
        TransformerConfig, "fmjax.models.text:TextEncoder", _token_inputs
    ),
    "decoder": ModelKind(
        TransformerConfig, "fmjax.models.text:TextDecoder", _token_inputs
    ),
    "vit": ModelKind(ViTConfig, "fmjax.models.vision:VisionTransformer", _image_inputs),
    "vit_mae": ModelKind(
        ViTConfig, "fmjax.models.mae:MaskedAutoencoder", _masked_image_inputs
    ),
    "dual_encoder": ModelKind(
        DualEncoderConfig, "fmjax.models.multimodal:DualEncoder", _image_text_inputs
    ),
}


def _kind(kind) -> ModelKind:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r}; expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def model_config(spec):
    """The validated config dataclass of a `config.model` group (a mapping with
    `kind`), or `spec` itself if it already is one. Bad values raise ValueError
    naming the field."""
    if not isinstance(spec, Mapping) and hasattr(type(spec), "__dataclass_fields__"):
        return spec
    fields = dict(spec)
    if "kind" not in fields:
        raise ValueError(
            f"model config has no 'kind'; expected one of {sorted(MODEL_KINDS)}"
        )
    return _kind(fields["kind"]).config_class.from_dict(fields)


def build_model(spec):
    """The flax module for a model config (dataclass, dict or ConfigDict)."""
    cfg = model_config(spec)
    return _kind(cfg.kind).module_class()(cfg)


def example_inputs(spec, rows: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) of zeros that trace the model's `init` (shapes only)."""
    cfg = model_config(spec)
    return _kind(cfg.kind).example_inputs(cfg, rows)


def abstract_model_params(spec):
    """The model's boxed params as ShapeDtypeStructs (nothing is allocated)."""
    cfg = model_config(spec)
    args, kwargs = example_inputs(cfg)
    return abstract_params(build_model(cfg), *args, **kwargs)


@functools.lru_cache(maxsize=32)
def _param_axes(cfg) -> tuple:
    return tuple(axes_of(abstract_model_params(cfg)).items())


def param_axes(spec) -> dict[str, tuple[str | None, ...]]:
    """{"/"-joined param path: logical axis names} of the model's params."""
    return dict(_param_axes(model_config(spec)))
