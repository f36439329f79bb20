"""`fmjax.load` of a PEFT LoRA adapter directory: the adapter folded into
its local HF base (BERT or GPT-2)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from fmjax.convert import hf


def is_peft_directory(path: str) -> bool:
    from fmjax.adapt.peft import ADAPTER_CONFIG

    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_peft(path: str):
    """A PEFT LoRA adapter directory over its HF base (`base_model_name_or_path`,
    a local directory): the adapter folded into the base's kernels. A BERT base
    gives its encoder, a GPT-2 base its decoder."""
    from fmjax.adapt import lora, peft
    from fmjax.api import Model, load
    from fmjax.models.registry import param_axes

    with open(os.path.join(path, peft.ADAPTER_CONFIG), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path") or ""
    if not hf.is_hf_directory(base):
        raise FileNotFoundError(
            f"PEFT adapter {path!r} names base_model_name_or_path={base!r}; expected "
            "a local HF model directory (fmjax reads no hub ids offline)"
        )
    model = load(base)
    cfg = model.config.model
    if cfg.kind == "decoder":
        params = peft.merge_peft_gpt2(path, model.params, cfg)
    else:
        adapters, lora_config = peft.load_peft(path, model.params, axes=param_axes(cfg))
        params = lora.merge(model.params, adapters, lora_config)
    params = jax.tree.map(jnp.asarray, params)
    return Model(model.module, params, model.tokenizer, model.config)
