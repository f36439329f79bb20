"""BERT in HF's naming vs fmjax's TextEncoder: module names, config fields and
tensor layouts (pure functions, no I/O; `fmjax.convert.hf` reads and writes).

Dense kernels are stored by torch as [out, in]; fmjax keeps einsum layouts
(query/key/value [D,H,K], attention out [H,K,D], MLP [D,F] and [F,D]), so each
kernel is transposed and its head axes split or merged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.errors import FormatError

# HF hidden_act -> fmjax activation (the tanh forms are the same function).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# fmjax activation -> HF hidden_act, for every converter (CLIP adds quick_gelu).
_HF_ACTIVATION = {"gelu": "gelu", "gelu_erfc": "gelu", "gelu_tanh": "gelu_new"}

# fmjax module path -> HF module name (layer modules relative to encoder.layer.{i}).
_TOP_MODULES = {
    "token_embed": "embeddings.word_embeddings",
    "position_embed": "embeddings.position_embeddings",
    "type_embed": "embeddings.token_type_embeddings",
    "embed_norm": "embeddings.LayerNorm",
    "mlm_transform": "cls.predictions.transform.dense",
    "mlm_norm": "cls.predictions.transform.LayerNorm",
    "mlm_bias": "cls.predictions",
}
_LAYER_MODULES = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "mlp/up": "intermediate.dense",
    "mlp/down": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Tensors fmjax has no place for (see the module docstring).
IGNORED = re.compile(r"embeddings\.position_ids|pooler\..*|cls\.seq_relationship\..*")
# The MLM decoder is tied to the word embeddings (and its bias to
# cls.predictions.bias); checkpoints may store the tied copies too.
TIED = {
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


def hf_name_for(fmjax_path: tuple[str, ...]) -> str:
    """The HF BertModel module name of a TextEncoder param or module path.

    ("layers_0", "attention", "query", "kernel") and ("layers_0", "attention",
    "query") both give "encoder.layer.0.attention.self.query" (the nn.Linear that
    PEFT targets); names carry no `bert.` prefix. Raises KeyError for a path that
    BERT has no module for.
    """
    path = tuple(fmjax_path)
    module = path[:-1] if path and path[-1] in _LEAVES else path
    if len(module) == 1 and module[0] in _TOP_MODULES:
        return _TOP_MODULES[module[0]]
    layer = re.fullmatch(r"layers_(\d+)", module[0]) if module else None
    inner = "/".join(module[1:])
    if layer and inner in _LAYER_MODULES:
        return f"encoder.layer.{layer[1]}.{_LAYER_MODULES[inner]}"
    raise KeyError(
        f"no HF BERT module for fmjax path {path}; expected a TextEncoder param "
        f"path such as ('layers_0', 'attention', 'query', 'kernel')"
    )


def tensor_name(path: tuple[str, ...]) -> str:
    return f"{hf_name_for(path)}.{_LEAVES.get(path[-1], 'bias')}"


def model_config_from_hf(hf: Mapping[str, Any], mlm_head: bool) -> dict[str, Any]:
    """fmjax's `config.model` group (kind "encoder") for an HF BertConfig dict."""
    if hf.get("model_type") != "bert":
        raise FormatError(
            f"HF model_type={hf.get('model_type')!r}: expected 'bert' (BertModel / "
            f"BertForMaskedLM checkpoints; GPT-2 loads with load_hf_gpt2)"
        )
    for key, want in (
        ("position_embedding_type", "absolute"),
        ("is_decoder", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, want) != want:
            raise FormatError(f"HF BERT {key}={hf[key]!r}: fmjax supports {want!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise FormatError(
            f"HF BERT hidden_act={act!r}: expected one of {sorted(_ACTIVATIONS)}"
        )
    d_model, heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % heads:
        raise FormatError(
            f"HF BERT hidden_size={d_model} is not divisible by "
            f"num_attention_heads={heads}"
        )
    return dict(
        kind="encoder",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        head_dim=d_model // heads,
        mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 512),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        position="learned",
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_ACTIVATIONS[act],
        init_std=hf.get("initializer_range", 0.02),
        dtype="float32",
        param_dtype="float32",
        mlm_head=mlm_head,
    )


def hf_config_from_model(model_config: Mapping[str, Any], pad_id: int) -> dict:
    """The HF BertConfig dict of an fmjax encoder config; refuses what BERT lacks."""
    from fmjax.models.registry import model_config as parse_model_config

    kind = dict(model_config).get("kind")
    if kind != "encoder":
        raise FormatError(f"model.kind={kind!r}: HF BERT export needs 'encoder'")
    cfg = parse_model_config(model_config)
    for ok, what in (
        (cfg.position == "learned", f"position={cfg.position!r} (BERT: 'learned')"),
        (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (no GQA)"),
        (
            cfg.num_heads * cfg.head_dim == cfg.d_model,
            f"num_heads*head_dim={cfg.num_heads * cfg.head_dim} (BERT: d_model="
            f"{cfg.d_model})",
        ),
    ):
        if not ok:
            raise FormatError(f"cannot express {what} as an HF BERT model")
    return {
        "architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": _HF_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "pad_token_id": int(pad_id),
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def to_fmjax(
    name: str, x: np.ndarray, path: tuple[str, ...], shape, num_in: int = 1
) -> np.ndarray:
    """An HF tensor in fmjax's layout; `num_in`: the kernel's input dims
    (`fmjax.models.axes.kernel_num_in` of its logical axes)."""
    if path[-1] == "kernel":  # torch [out, in] -> einsum [in..., out...]
        k = num_in
        want = (math.prod(shape[k:]), math.prod(shape[:k]))
    else:
        want = shape if path[-1] == "embedding" else (math.prod(shape),)
    if x.shape != want:
        raise FormatError(
            f"HF tensor {name} has shape {x.shape}; expected {want} for fmjax "
            f"{'/'.join(path)} of shape {shape}"
        )
    x = x.T if path[-1] == "kernel" else x
    return np.ascontiguousarray(x.reshape(shape), np.float32)


def to_hf(x: np.ndarray, path: tuple[str, ...], num_in: int = 1) -> np.ndarray:
    if path[-1] == "kernel":
        x = x.reshape(math.prod(x.shape[:num_in]), -1).T
    elif path[-1] != "embedding":
        x = x.reshape(-1)
    return np.ascontiguousarray(x, np.float32)
