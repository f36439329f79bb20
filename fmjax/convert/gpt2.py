"""GPT-2 in HF's naming vs fmjax's TextDecoder: tensor names, config fields and
tensor layouts (pure functions, no I/O; `fmjax.convert.hf` reads and writes).

GPT-2's projections are `Conv1D`s whose weights are already [in, out], so a
kernel only changes shape: `attn.c_attn` [D, 3D] holds query, key and value
side by side on its output axis, each split into fmjax's [D,H,K];
`attn.c_proj` [D, D] is attention out [H,K,D]; `mlp.c_fc` [D,F] and
`mlp.c_proj` [F,D] are the MLP's up and down. The LM head (`lm_head.weight`)
is tied to `wte.weight`: a checkpoint may store the tied copy, which must then
equal it. `h.{i}.attn.bias` / `attn.masked_bias` (causal-mask buffers of old
checkpoints) are ignored.

Names are GPT2Model's (`wte.weight`, `h.0.ln_1.weight`); GPT2LMHeadModel
stores them under `transformer.`, which `strip_prefix` removes and
`hf_from_params` writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.convert.bert import _HF_ACTIVATION
from fmjax.errors import FormatError

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# HF activation_function -> fmjax activation (the tanh forms are one function).
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}
# Config keys whose other values change the function GPT-2 computes, with the
# value fmjax computes. `reorder_and_upcast_attn` is absent on purpose: it only
# changes numerics (fmjax's softmax is float32 anyway), not the function.
_FIXED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
_TOP = {
    ("token_embed", "embedding"): "wte.weight",
    ("position_embed", "embedding"): "wpe.weight",
    ("final_norm", "scale"): "ln_f.weight",
    ("final_norm", "bias"): "ln_f.bias",
}
# Layer params (relative to layers_{i}) -> tensors relative to h.{i}.
_LAYER = {
    ("attention_norm", "scale"): "ln_1.weight",
    ("attention_norm", "bias"): "ln_1.bias",
    ("attention", "out", "kernel"): "attn.c_proj.weight",
    ("attention", "out", "bias"): "attn.c_proj.bias",
    ("mlp_norm", "scale"): "ln_2.weight",
    ("mlp_norm", "bias"): "ln_2.bias",
    ("mlp", "up", "kernel"): "mlp.c_fc.weight",
    ("mlp", "up", "bias"): "mlp.c_fc.bias",
    ("mlp", "down", "kernel"): "mlp.c_proj.weight",
    ("mlp", "down", "bias"): "mlp.c_proj.bias",
}
# c_attn's output columns: query, then key, then value.
QKV = ("query", "key", "value")
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def strip_prefix(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`weights` with GPT2LMHeadModel's `transformer.` prefix removed."""
    out = {}
    for name, value in weights.items():
        short = name.removeprefix(PREFIX)
        if short in out:
            raise FormatError(
                f"HF GPT-2 tensor {short!r} appears both with and without the "
                f"{PREFIX!r} prefix"
            )
        out[short] = value
    return out


def tensor_name(path: tuple[str, ...]) -> tuple[str, int | None]:
    """(GPT2Model tensor name, index into c_attn's q|k|v thirds or None) of a
    TextDecoder param path. Raises KeyError for a path GPT-2 has no tensor for."""
    path = tuple(path)
    if path in _TOP:
        return _TOP[path], None
    if path == ("lm_head", "kernel"):
        return LM_HEAD, None
    layer = re.fullmatch(r"layers_(\d+)", path[0]) if path else None
    if layer:
        inner = path[1:]
        if inner in _LAYER:
            return f"h.{layer[1]}.{_LAYER[inner]}", None
        if len(inner) == 3 and inner[0] == "attention" and inner[1] in QKV:
            leaf = {"kernel": "weight", "bias": "bias"}.get(inner[2])
            if leaf:
                return f"h.{layer[1]}.attn.c_attn.{leaf}", QKV.index(inner[1])
    raise KeyError(
        f"no HF GPT-2 tensor for fmjax path {path}; expected a TextDecoder param "
        f"path such as ('layers_0', 'attention', 'query', 'kernel')"
    )


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """fmjax's `config.model` group (kind "decoder") for an HF GPT2Config dict;
    a key whose value fmjax cannot compute raises FormatError naming it."""
    if hf.get("model_type") != "gpt2":
        raise FormatError(
            f"HF model_type={hf.get('model_type')!r}: expected 'gpt2' "
            f"(GPT2Model / GPT2LMHeadModel checkpoints)"
        )
    for key, want in _FIXED.items():
        if hf.get(key, want) != want:
            raise FormatError(f"HF GPT-2 {key}={hf[key]!r}: fmjax supports {want!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise FormatError(
            f"HF GPT-2 activation_function={act!r}: expected one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    d_model, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    if d_model % heads:
        raise FormatError(
            f"HF GPT-2 n_embd={d_model} is not divisible by n_head={heads}"
        )
    dropout = hf.get("resid_pdrop", 0.1)
    return dict(
        kind="decoder",
        vocab_size=hf.get("vocab_size", 50257),
        d_model=d_model,
        num_layers=hf.get("n_layer", 12),
        num_heads=heads,
        head_dim=d_model // heads,
        mlp_dim=hf.get("n_inner") or 4 * d_model,
        max_len=hf.get("n_positions", 1024),
        # fmjax has one rate for the embeddings and the residual branches.
        dropout_rate=dropout,
        attention_dropout_rate=hf.get("attn_pdrop", 0.1),
        position="learned",
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[act],
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype="float32",
        param_dtype="float32",
    )


def hf_config_from_model(
    model_config: Mapping[str, Any],
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The HF GPT2Config dict (GPT2LMHeadModel) of an fmjax decoder config;
    refuses what GPT-2 lacks (RoPE, grouped-query attention, head widths that do
    not add up to d_model)."""
    from fmjax.models.registry import model_config as parse_model_config

    kind = dict(model_config).get("kind")
    if kind != "decoder":
        raise FormatError(f"model.kind={kind!r}: HF GPT-2 export needs 'decoder'")
    cfg = parse_model_config(model_config)
    for ok, what in (
        (cfg.position == "learned", f"position={cfg.position!r} (GPT-2: 'learned')"),
        (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (no GQA)"),
        (
            cfg.num_heads * cfg.head_dim == cfg.d_model,
            f"num_heads*head_dim={cfg.num_heads * cfg.head_dim} (GPT-2: d_model="
            f"{cfg.d_model})",
        ),
    ):
        if not ok:
            raise FormatError(f"cannot express {what} as an HF GPT-2 model")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim,
        "n_positions": cfg.max_len,
        "activation_function": _HF_ACTIVATION[cfg.activation],
        "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None if bos_id is None else int(bos_id),
        "eos_token_id": None if eos_id is None else int(eos_id),
        "pad_token_id": None if pad_id is None else int(pad_id),
    }


def _check_shape(name: str, x: np.ndarray, want: tuple[int, ...], path) -> None:
    if tuple(x.shape) != tuple(want):
        raise FormatError(
            f"HF tensor {name} has shape {tuple(x.shape)}; expected {tuple(want)} "
            f"for fmjax {'/'.join(path)}"
        )


def params_from_hf(
    weights: Mapping[str, np.ndarray],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    source: str = "HF GPT-2 weights",
) -> dict[tuple[str, ...], np.ndarray]:
    """Flat {path: float32 array} of a TextDecoder with param `shapes` from
    GPT2Model-named `weights` (`strip_prefix` first). A missing tensor, a tensor
    that maps nowhere, or an LM head that differs from the tied embeddings
    raises FormatError naming it (and `source`)."""
    tied = ("lm_head", "kernel") not in shapes
    flat, missing, used = {}, [], set()
    for path, shape in shapes.items():
        name, third = tensor_name(path)
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        x = np.asarray(weights[name])
        if path == ("lm_head", "kernel"):  # nn.Linear: [V, D]
            _check_shape(name, x, shape[::-1], path)
            x = x.T
        elif third is not None:  # a third of c_attn's output axis
            width = int(np.prod(shape[-2:]))  # H*K
            fused = (3 * width,) if path[-1] == "bias" else (shape[0], 3 * width)
            _check_shape(name, x, fused, path)
            x = x[..., third * width : (third + 1) * width]
        else:
            _check_shape(name, x, _hf_shape(path, shape), path)
        flat[path] = np.ascontiguousarray(x.reshape(shape), np.float32)
    if tied and LM_HEAD in weights:
        used.add(LM_HEAD)
        wte = weights.get(_TOP[("token_embed", "embedding")])
        if wte is not None and not np.array_equal(weights[LM_HEAD], wte):
            raise FormatError(
                f"{source}: {LM_HEAD} differs from wte.weight; the config ties "
                f"them (tie_word_embeddings), so fmjax cannot hold an untied copy"
            )
    unused = sorted(n for n in set(weights) - used if not IGNORED.fullmatch(n))
    if missing or unused:
        raise FormatError(
            f"{source} do not match an fmjax GPT-2 of its config.json: missing "
            f"tensors {missing}; tensors with no fmjax param {unused}"
        )
    return flat


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a param GPT-2 stores unsplit: a Conv1D kernel [in, out]
    (attention out [H,K,D] -> [H*K, D]), a bias or norm flat, an embedding as is."""
    if path[-1] == "kernel":
        return (int(np.prod(shape[:-1])), shape[-1])
    return tuple(shape) if path[-1] == "embedding" else (int(np.prod(shape)),)


def hf_from_params(
    flat: Mapping[tuple[str, ...], np.ndarray],
) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel tensors (`transformer.` names, float32) of a TextDecoder's
    flat {path: array}; q/k/v are concatenated into c_attn. No `lm_head.weight`
    when tied (transformers ties it to wte on load)."""
    tensors: dict[str, np.ndarray] = {}
    thirds: dict[str, list] = {}
    for path, value in flat.items():
        name, third = tensor_name(path)
        x = np.asarray(value, np.float32)
        if path == ("lm_head", "kernel"):
            tensors[LM_HEAD] = np.ascontiguousarray(x.T)
            continue
        if third is not None:
            columns = x.reshape(x.shape[0], -1) if path[-1] == "kernel" else x.ravel()
            thirds.setdefault(name, [None] * len(QKV))[third] = columns
            continue
        tensors[PREFIX + name] = np.ascontiguousarray(
            x.reshape(_hf_shape(path, x.shape))
        )
    for name, parts in thirds.items():
        if any(p is None for p in parts):
            absent = [q for q, p in zip(QKV, parts, strict=True) if p is None]
            raise FormatError(f"params lack the {absent} parts of HF tensor {name}")
        tensors[PREFIX + name] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
    return tensors


def to_torch_model(model_config: Mapping[str, Any], params):
    """A `transformers.GPT2LMHeadModel` (float32) holding fmjax decoder `params`
    (a nested dict of arrays, as TextDecoder's init returns, unboxed)."""
    import torch
    import transformers
    from flax import traverse_util

    hf_config = hf_config_from_model(model_config)
    hf_config.pop("model_type")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config))
    flat = {
        path: np.asarray(value, np.float32)
        for path, value in traverse_util.flatten_dict(dict(params)).items()
    }
    state = {k: torch.tensor(v) for k, v in hf_from_params(flat).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != LM_HEAD and not IGNORED.search(k)]
    if missing or unexpected:
        raise FormatError(
            f"params do not fill a GPT2LMHeadModel: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.tie_weights()
    return model
