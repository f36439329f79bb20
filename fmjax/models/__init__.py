"""fmjax models; `registry` maps a model kind to its config and module."""

from fmjax.models.registry import build_model, model_config, param_axes

__all__ = ["build_model", "model_config", "param_axes"]
