"""fmjax models: text encoders and decoders (vision and multimodal come later)."""

from __future__ import annotations

from collections.abc import Mapping


def build_model(model_config: Mapping):
    """The flax module for a `config.model` group: `kind` plus TransformerConfig."""
    from fmjax.models.config import TransformerConfig
    from fmjax.models.text import TextDecoder, TextEncoder

    fields = dict(model_config)
    kind = fields.pop("kind")
    classes = {"encoder": TextEncoder, "decoder": TextDecoder}
    if kind not in classes:
        raise ValueError(f"model.kind={kind!r}; expected one of {sorted(classes)}")
    return classes[kind](TransformerConfig.from_dict(fields))
