"""HF CLIP (`CLIPModel`) <-> fmjax DualEncoder: config, tensor names and
layouts (`fmjax.convert.clip_directory` reads and writes the directories).

An HF CLIP directory holds `config.json` (model_type "clip": text_config and
vision_config, projection_dim, logit_scale_init_value), `model.safetensors`
(CLIPModel names: `vision_model.*`, `text_model.*`, `visual_projection.weight`,
`text_projection.weight`, `logit_scale`), CLIP's BPE `tokenizer.json`
(`fmjax.data.bpe.CLIPBPETokenizer`) and `preprocessor_config.json`
(CLIPImageProcessor). It becomes a DualEncoder with a ViT image tower (learned
positions, cls readout, `pre_norm`) and a TextDecoder text tower (learned
positions, causal pre-LN blocks, final norm) pooled at the last real token,
both with CLIP's activation (quick_gelu).

Layouts. Dense kernels are torch [out, in] and get fmjax's head axes as in
`fmjax.convert.bert`; the patch Conv2d [D, C, p, p] becomes [(p q C), D] as
in `fmjax.convert.vit`. CLIP's conv has no bias: an import sets fmjax's
`patch_embed/bias` to zero.

Positions. HF adds `position_embedding` [1+P, D] to [class_embedding,
patches]; fmjax adds its [P, D] table to the patches and prepends `cls` after,
so an import takes cls = class_embedding + row 0 and the table = rows 1:.
An export writes class_embedding = cls, row 0 = 0 and rows 1: = table + the
patch bias (folded in, as HF has none); a sin-cos fmjax ViT exports its fixed
table. Outputs are unchanged both ways.

Norms. HF's `post_layernorm` normalises the pooled class token; fmjax's
`encoder_norm` normalises every token and pools token 0: the same numbers.

Text pooling. HF pools the first `eos_token_id` (or, for the legacy
eos_token_id 2, the largest id: `<|endoftext|>` is CLIP's last id); fmjax
pools the last real token (segment id > 0, right padding). They agree on
what CLIP's tokenizer makes: bos, text, eos, then padding.

Images. `preprocess_images` (`fmjax.convert.clip_images`) repeats
CLIPImageProcessor; an import keeps its settings as config `image_processor`.

Not converted: SigLIP's `logit_bias` (an export refuses it), text towers
other than a learned-position decoder, an image tower without `pre_norm`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.convert.bert import _HF_ACTIVATION as bert_hf_activation
from fmjax.convert.bert import to_fmjax, to_hf
from fmjax.convert.clip_images import (
    preprocess_images,
)
from fmjax.convert.gpt2 import _check_shape
from fmjax.convert.vit import _square
from fmjax.data.tokenizer import Tokenizer
from fmjax.errors import FormatError
from fmjax.models.vision import sincos2d_positions

__all__ = [
    "hf_config_from_model",
    "hf_from_params",
    "model_config_from_hf",
    "params_from_hf",
    "preprocess_images",
    "tensor_name",
]
MODEL_TYPE = "clip"
KIND = "dual_encoder"
# HF hidden_act -> fmjax activation, and back.
_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_HF_ACTIVATION = {**bert_hf_activation, "quick_gelu": "quick_gelu"}
# Buffers old checkpoints store; fmjax computes them.
IGNORED = re.compile(r"(text|vision)_model\.embeddings\.position_ids")

_TOWERS = {"image": "vision_model", "text": "text_model"}
# "/"-joined fmjax paths -> HF names: outside the towers, then inside one
# (relative to its prefix), then blocks (relative to encoder.layers.{i}).
_TOP = {
    "image_proj/kernel": "visual_projection.weight",
    "text_proj/kernel": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_IN_TOWER = {
    "patch_embed/kernel": "embeddings.patch_embedding.weight",
    "cls": "embeddings.class_embedding",
    "position_embed": "embeddings.position_embedding.weight",
    "token_embed/embedding": "embeddings.token_embedding.weight",
    "position_embed/embedding": "embeddings.position_embedding.weight",
    "pre_norm/scale": "pre_layrnorm.weight",
    "pre_norm/bias": "pre_layrnorm.bias",
    "encoder_norm/scale": "post_layernorm.weight",
    "encoder_norm/bias": "post_layernorm.bias",
    "final_norm/scale": "final_layer_norm.weight",
    "final_norm/bias": "final_layer_norm.bias",
}
_LAYER = {
    "attention/query": "self_attn.q_proj",
    "attention/key": "self_attn.k_proj",
    "attention/value": "self_attn.v_proj",
    "attention/out": "self_attn.out_proj",
    "attention_norm": "layer_norm1",
    "mlp_norm": "layer_norm2",
    "mlp/up": "mlp.fc1",
    "mlp/down": "mlp.fc2",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
PATCH_BIAS = ("image", "patch_embed", "bias")  # no HF tensor: folded into positions
_CLS, _TABLE = ("image", "cls"), ("image", "position_embed")


def tensor_name(path: tuple[str, ...]) -> str:
    """The CLIPModel tensor name of a DualEncoder param path; KeyError for a
    path CLIP has no tensor for (the patch bias, a logit bias)."""
    path = tuple(path)
    if "/".join(path) in _TOP:
        return _TOP["/".join(path)]
    if len(path) > 1 and path[0] in _TOWERS and path != PATCH_BIAS:
        prefix, inner = _TOWERS[path[0]], path[1:]
        if "/".join(inner) in _IN_TOWER:
            return f"{prefix}.{_IN_TOWER['/'.join(inner)]}"
        layer = re.fullmatch(r"layers_(\d+)", inner[0])
        module, leaf = "/".join(inner[1:-1]), _LEAVES.get(inner[-1])
        if layer and leaf and module in _LAYER:
            return f"{prefix}.encoder.layers.{layer[1]}.{_LAYER[module]}.{leaf}"
    raise KeyError(
        f"no HF CLIP tensor for fmjax path {path}; expected a DualEncoder param "
        f"path such as ('image', 'layers_0', 'attention', 'query', 'kernel')"
    )


# --- config ---------------------------------------------------------------------


def _activation(tower: Mapping[str, Any], what: str) -> str:
    act = tower.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise FormatError(
            f"HF CLIP {what}.hidden_act={act!r}: expected one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[act]


def _head_dim(tower: Mapping[str, Any], what: str) -> int:
    width, heads = tower["hidden_size"], tower["num_attention_heads"]
    if width % heads:
        raise FormatError(
            f"HF CLIP {what}.hidden_size={width} is not divisible by "
            f"num_attention_heads={heads}"
        )
    return width // heads


def _towers(hf_config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(text_config, vision_config) with CLIPTextConfig's / CLIPVisionConfig's
    defaults under what config.json sets (old files say `*_config_dict`)."""
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12)
    text.update(num_attention_heads=8, vocab_size=49408, max_position_embeddings=77)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
    vision.update(num_attention_heads=12, image_size=224, patch_size=32)
    for name, tower in (("text", text), ("vision", vision)):
        # CLIPConfig lets `*_config_dict` override `*_config`.
        tower.update(hf_config.get(f"{name}_config") or {})
        tower.update(hf_config.get(f"{name}_config_dict") or {})
    return text, vision


def model_config_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """fmjax's `config.model` group (kind "dual_encoder") for an HF CLIPConfig
    dict; what fmjax cannot compute raises FormatError naming it."""
    if hf_config.get("model_type") != MODEL_TYPE:
        raise FormatError(
            f"HF model_type={hf_config.get('model_type')!r}: expected 'clip' "
            f"(CLIPModel checkpoints)"
        )
    text, vision = _towers(hf_config)
    common = dict(dtype="float32", param_dtype="float32")
    image = dict(
        image_size=_square(vision, "image_size", 224),
        patch_size=_square(vision, "patch_size", 32),
        channels=vision.get("num_channels", 3),
        d_model=vision["hidden_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        head_dim=_head_dim(vision, "vision_config"),
        mlp_dim=vision["intermediate_size"],
        position="learned",
        pool="cls",
        pre_norm=True,
        attention_dropout_rate=vision.get("attention_dropout", 0.0),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        activation=_activation(vision, "vision_config"),
        init_std=vision.get("initializer_range", 0.02),
        patch_init="normal",  # HF CLIP's init
        **common,
    )
    text_model = dict(
        kind="decoder",
        vocab_size=text["vocab_size"],
        d_model=text["hidden_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        head_dim=_head_dim(text, "text_config"),
        mlp_dim=text["intermediate_size"],
        max_len=text["max_position_embeddings"],
        position="learned",
        dropout_rate=0.0,  # CLIP's towers drop attention weights only
        attention_dropout_rate=text.get("attention_dropout", 0.0),
        layer_norm_eps=text.get("layer_norm_eps", 1e-5),
        activation=_activation(text, "text_config"),
        init_std=text.get("initializer_range", 0.02),
        tie_embeddings=True,  # no LM head: the tower's logits are never read
        **common,
    )
    return dict(
        kind=KIND,
        image=image,
        text=text_model,
        embed_dim=hf_config.get("projection_dim", 512),
        text_pool="last",
        logit_scale_init=float(hf_config.get("logit_scale_init_value", 2.6592)),
        logit_bias_init=None,
    )


def hf_config_from_model(model: Mapping[str, Any], tokenizer: Tokenizer) -> dict:
    """The HF CLIPConfig dict (CLIPModel) of a fmjax DualEncoder config, with
    the tokenizer's bos / eos / pad ids; refuses what CLIP cannot express."""
    from fmjax.models.registry import model_config as parse_model_config

    if dict(model).get("kind") != KIND:
        raise FormatError(f"model.kind={model.get('kind')!r}: HF CLIP needs {KIND!r}")
    cfg = parse_model_config(model)
    image, text = cfg.image, cfg.text
    for ok, what in (
        (cfg.logit_bias_init is None, "a logit_bias (SigLIP; CLIP has none)"),
        (cfg.text_pool == "last", f"text_pool={cfg.text_pool!r} (CLIP: 'last')"),
        (image.pool == "cls", f"image.pool={image.pool!r} (CLIP: 'cls')"),
        (image.pre_norm, "image.pre_norm=False (CLIP has pre_layrnorm)"),
        (text.kind == "decoder", f"text.kind={text.kind!r} (CLIP: 'decoder')"),
        (text.position == "learned", f"text.position={text.position!r}"),
        (text.kv_heads == text.num_heads, f"text.num_kv_heads={text.num_kv_heads}"),
    ):
        if not ok:
            raise FormatError(f"cannot express {what} as an HF CLIP model")
    for name, tower in (("image", image), ("text", text)):
        if tower.num_heads * tower.head_dim != tower.d_model:
            raise FormatError(
                f"cannot express {name}.num_heads*head_dim="
                f"{tower.num_heads * tower.head_dim} != d_model={tower.d_model} as "
                f"an HF CLIP model"
            )

    def tower(t) -> dict[str, Any]:
        return {
            "hidden_size": t.d_model,
            "intermediate_size": t.mlp_dim,
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "hidden_act": _HF_ACTIVATION[t.activation],
            "layer_norm_eps": t.layer_norm_eps,
            "attention_dropout": t.attention_dropout_rate,
            "initializer_range": t.init_std,
            "initializer_factor": 1.0,
        }

    return {
        "architectures": ["CLIPModel"],
        "model_type": MODEL_TYPE,
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": {
            **tower(text),
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_len,
            "bos_token_id": int(tokenizer.bos_id),
            "eos_token_id": int(tokenizer.eos_id),
            "pad_token_id": int(tokenizer.pad_id),
        },
        "vision_config": {
            **tower(image),
            "model_type": "clip_vision_model",
            "image_size": image.image_size,
            "patch_size": image.patch_size,
            "num_channels": image.channels,
        },
    }


# --- tensors --------------------------------------------------------------------


def _float32(x) -> np.ndarray:
    """A C-contiguous float32 array; 0-d stays 0-d (np.ascontiguousarray
    would make logit_scale [1])."""
    return np.array(x, np.float32, order="C", copy=None)


def params_from_hf(
    weights: Mapping[str, np.ndarray],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    model: Mapping[str, Any],
    num_in: Mapping[tuple[str, ...], int],
    source: str = "HF CLIP weights",
) -> dict[tuple[str, ...], np.ndarray]:
    """Flat {path: float32 array} of a DualEncoder with `model` config and
    param `shapes` from CLIPModel-named `weights`; `num_in`: each kernel's
    input dims. A missing tensor or one that maps nowhere raises FormatError
    naming it (and `source`)."""
    image = model["image"]
    patch, channels = image["patch_size"], image["channels"]
    flat, missing, used = {}, [], set()
    for path, shape in shapes.items():
        if path == PATCH_BIAS:
            flat[path] = np.zeros(shape, np.float32)
            continue
        name = tensor_name(path)
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        x = np.asarray(weights[name], np.float32)
        if path in (_CLS, _TABLE):
            table_name = tensor_name(_TABLE)
            if table_name not in weights:
                missing.append(table_name)
                continue
            used.add(table_name)
            table = np.asarray(weights[table_name], np.float32)
            rows, width = shapes[_TABLE]
            _check_shape(table_name, table, (rows + 1, width), _TABLE)
            if path == _CLS:  # fold HF's position 0 into the token
                _check_shape(name, x, (width,), path)
                x = (x + table[0]).reshape(shape)
            else:
                x = table[1:]
        elif path == ("image", "patch_embed", "kernel"):
            _check_shape(name, x, (shape[1], channels, patch, patch), path)
            x = x.transpose(2, 3, 1, 0).reshape(shape)
        elif path == ("logit_scale",):
            _check_shape(name, x.reshape(-1), (1,), path)
            x = x.reshape(shape)
        else:
            x = to_fmjax(name, x, path, shape, num_in.get(path, 1))
        flat[path] = _float32(x)
    unused = sorted(n for n in set(weights) - used if not IGNORED.fullmatch(n))
    if missing or unused:
        raise FormatError(
            f"{source} do not match an fmjax DualEncoder of its config.json: "
            f"missing tensors {sorted(set(missing))}; tensors with no fmjax param "
            f"{unused}"
        )
    return flat


def hf_from_params(
    flat: Mapping[tuple[str, ...], np.ndarray],
    model: Mapping[str, Any],
    num_in: Mapping[tuple[str, ...], int],
) -> dict[str, np.ndarray]:
    """CLIPModel tensors (float32) of a DualEncoder's flat {path: array}: the
    patch bias folded into the position table (a sin-cos ViT's fixed table
    written as CLIP's learned one)."""
    from fmjax.models.registry import model_config as parse_model_config

    image = parse_model_config(model).image
    patch, channels = image.patch_size, image.channels
    table = (
        flat[_TABLE]
        if image.position == "learned"
        else sincos2d_positions(image.image_size // patch, image.d_model)
    )
    rows = np.asarray(table, np.float32) + np.asarray(flat[PATCH_BIAS], np.float32)
    tensors = {tensor_name(_TABLE): np.concatenate([np.zeros_like(rows[:1]), rows])}
    for path, value in flat.items():
        x = np.asarray(value, np.float32)
        if path in (PATCH_BIAS, _TABLE):
            continue
        if path == _CLS:
            x = x.reshape(-1)
        elif path == ("image", "patch_embed", "kernel"):
            x = x.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)
        elif path == ("logit_scale",):
            x = x.reshape(())
        else:
            x = to_hf(x, path, num_in.get(path, 1))
        tensors[tensor_name(path)] = _float32(x)
    return tensors
