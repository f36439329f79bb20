"""HF ViT / ViTMAE in HF's naming vs fmjax's VisionTransformer /
MaskedAutoencoder: tensor names, config fields, tensor layouts and image
preprocessing (pure functions, no I/O; `fmjax.convert.hf` reads and writes).

Names are those every ViT checkpoint stores (transformers 4 and 5 write them):
`embeddings.*`, `encoder.layer.{i}.*` and `layernorm.*`, under `vit.` in a
ViTForImageClassification (beside `classifier.*`) or a ViTMAEForPreTraining
(beside `decoder.*`; transformers 5.x writes the decoder's layers as
`decoder.decoder_encoder.layer.{i}`, which reads as `decoder.decoder_layers.{i}`).

Layouts. The patch embedding is a Conv2d, OIHW [D, C, p, p]; fmjax's kernel is
[(p q C), D] for patches flattened (row, column, channel), so the weight is
transposed to [p, q, C, D] and reshaped. Dense kernels are torch [out, in] and
get fmjax's head axes as in `fmjax.convert.bert`.

Positions. HF ViT adds `position_embeddings` [1, 1+P, D] to [cls, patches];
fmjax adds its [P, D] table to the patches only and prepends `cls` after, so
an import takes cls = cls_token + position_embeddings[0] and the table
position_embeddings[1:], and an export writes fmjax's cls with a zero position
0: outputs are unchanged both ways and the round trip is exact. An imported
ViT has learned positions; a fmjax ViT with 2-D sin-cos positions exports its
table as HF's (learned) one. ViTMAE's tables (encoder and decoder) are MAE's
fixed 2-D sin-cos with a zero cls row, in the MAE reference's layout (first
half of the features the column, second half the row), which is fmjax's
`sincos2d_positions`: an import checks that the stored tables are that (HF's
encoder adds row 0 to cls, which the import folds in; the decoder row 0 must be
zero, as fmjax's decoder gives cls no position) and refuses any other table.

Preprocessing (`fmjax.convert.vit_images`). `preprocess_images` repeats
ViTImageProcessor (Pillow resize of the uint8 image, rescale, normalise) from
preprocessor_config.json. An export of a fmjax run writes its data.mean /
data.std there; fmjax's own pipeline resizes float images, HF uint8 ones, so
features of images not already at the model's size differ by that rounding.

Not converted. HF ViTModel's pooler (dense + tanh over [cls]) has no fmjax
counterpart: an import ignores `pooler.*` and an export writes none, so
`transformers.AutoModel` reports the pooler as newly (randomly) initialised;
use `last_hidden_state[:, 0]` (the final-LayerNorm cls state, fmjax's pooled
feature) rather than `pooler_output`. A self-supervised run's projection head
(`projection/*`, dropped for evaluation too) is not exported either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmjax.convert.bert import _ACTIVATIONS, _HF_ACTIVATION, to_fmjax, to_hf
from fmjax.convert.gpt2 import _check_shape
from fmjax.convert.vit_images import image_processor_from_hf
from fmjax.errors import FormatError
from fmjax.models.vision import sincos2d_positions

# HF model_type -> fmjax model kind.
MODEL_TYPES = {"vit": "vit", "vit_mae": "vit_mae"}
PREFIX = "vit."
CLASSIFIER = "classifier."
# Tensors fmjax has no place for (see the module docstring).
IGNORED = re.compile(r"pooler\..*")
# fmjax params left out of an export (a self-supervised run's head).
NOT_EXPORTED = ("projection",)
# Tolerance for a stored sin-cos table against fmjax's (both float32 roundings
# of one float64 formula).
_TABLE_ATOL = 1e-5

_TOP = {
    ("cls",): "embeddings.cls_token",
    ("position_embed",): "embeddings.position_embeddings",
    ("patch_embed", "kernel"): "embeddings.patch_embeddings.projection.weight",
    ("patch_embed", "bias"): "embeddings.patch_embeddings.projection.bias",
    ("mask_token",): "decoder.mask_token",
}
_MODULES = {
    "encoder_norm": "layernorm",
    "classifier": "classifier",
    "decoder_embed": "decoder.decoder_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}
# Block modules (relative to layers_{i}) -> HF (relative to encoder.layer.{i}).
_LAYER = {
    ("attention", "query"): "attention.attention.query",
    ("attention", "key"): "attention.attention.key",
    ("attention", "value"): "attention.attention.value",
    ("attention", "out"): "attention.output.dense",
    ("attention_norm",): "layernorm_before",
    ("mlp_norm",): "layernorm_after",
    ("mlp", "up"): "intermediate.dense",
    ("mlp", "down"): "output.dense",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_QKV_BIAS = re.compile(r"attention\.attention\.(query|key|value)\.bias$")
_ENCODER_TABLE = "embeddings.position_embeddings"
_DECODER_TABLE = "decoder.decoder_pos_embed"


def tensor_name(path: tuple[str, ...]) -> str:
    """The HF tensor name of a fmjax param path: ViTModel names for a
    VisionTransformer (`classifier.*` for its head), ViTMAEForPreTraining names
    for a MaskedAutoencoder (its encoder's under `vit.`). Raises KeyError for a
    path ViT has no tensor for."""
    path = tuple(path)
    if path[:1] == ("encoder",):
        return PREFIX + tensor_name(path[1:])
    if path in _TOP:
        return _TOP[path]
    module, leaf = path[:-1], _LEAVES.get(path[-1]) if path else None
    if leaf and len(module) == 1 and module[0] in _MODULES:
        return f"{_MODULES[module[0]]}.{leaf}"
    layer = re.fullmatch(r"(decoder_)?layers_(\d+)", module[0]) if module else None
    if leaf and layer and module[1:] in _LAYER:
        stack = "decoder.decoder_layers" if layer[1] else "encoder.layer"
        return f"{stack}.{layer[2]}.{_LAYER[module[1:]]}.{leaf}"
    raise KeyError(
        f"no HF ViT tensor for fmjax path {path}; expected a VisionTransformer or "
        f"MaskedAutoencoder param path such as ('layers_0', 'attention', 'query', "
        f"'kernel')"
    )


def normalise_names(
    weights: Mapping[str, np.ndarray], kind: str
) -> dict[str, np.ndarray]:
    """`weights` named as `tensor_name` gives them: a ViT's without the `vit.`
    of ViTForImageClassification; a MAE decoder's layers as decoder_layers."""
    out = {}
    for name, value in weights.items():
        short = name
        if kind == "vit" and not name.startswith(CLASSIFIER):
            short = name.removeprefix(PREFIX)
        short = re.sub(
            r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers.", short
        )
        if short in out:
            raise FormatError(f"HF ViT tensor {short!r} appears under two names")
        out[short] = value
    return out


def _square(hf: Mapping[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise FormatError(f"HF ViT {key}={value!r}: fmjax supports square sizes")
        value = value[0]
    return int(value)


def _heads(width: int, heads: int, what: str) -> int:
    if width % heads:
        raise FormatError(
            f"HF ViT {what} width {width} is not divisible by {heads} heads"
        )
    return width // heads


def model_config_from_hf(hf: Mapping[str, Any], num_classes: int = 0) -> dict:
    """fmjax's `config.model` group for an HF ViTConfig (kind "vit", learned
    positions, cls readout, `num_classes` classifier rows) or ViTMAEConfig
    (kind "vit_mae") dict; what fmjax cannot compute raises FormatError."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FormatError(
            f"HF model_type={model_type!r}: expected one of {sorted(MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise FormatError(
            f"HF ViT hidden_act={act!r}: expected one of {sorted(_ACTIVATIONS)}"
        )
    d_model, heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    config = dict(
        kind=MODEL_TYPES[model_type],
        image_size=_square(hf, "image_size", 224),
        patch_size=_square(hf, "patch_size", 16),
        channels=hf.get("num_channels", 3),
        d_model=d_model,
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=heads,
        head_dim=_heads(d_model, heads, "hidden_size"),
        mlp_dim=hf.get("intermediate_size", 3072),
        position="learned",
        pool="cls",
        num_classes=num_classes,
        dropout_rate=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_ACTIVATIONS[act],
        init_std=hf.get("initializer_range", 0.02),
        patch_init="normal",  # HF ViT's init; ViTMAE's is Xavier (below)
        dtype="float32",
        param_dtype="float32",
    )
    if model_type == "vit_mae":
        width, decoder_heads = (
            hf.get("decoder_hidden_size", 512),
            hf.get("decoder_num_attention_heads", 16),
        )
        config.update(
            position="sincos2d",
            patch_init="xavier",
            decoder_d_model=width,
            decoder_layers=hf.get("decoder_num_hidden_layers", 8),
            decoder_heads=decoder_heads,
            decoder_head_dim=_heads(width, decoder_heads, "decoder_hidden_size"),
            decoder_mlp_dim=hf.get("decoder_intermediate_size", 2048),
        )
    return config


def hf_config_from_model(
    model: Mapping[str, Any],
    label_names: Sequence[str] = (),
    objective: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The HF config dict of a fmjax ViT (ViTModel, or
    ViTForImageClassification with a classifier; `label_names` give id2label)
    or MaskedAutoencoder (ViTMAEForPreTraining; mask_ratio and norm_pix_loss
    from the run's `objective`). Refuses what HF ViT cannot express."""
    from fmjax.models.registry import model_config as parse_model_config

    kind = dict(model).get("kind")
    if kind not in MODEL_TYPES.values():
        raise FormatError(
            f"model.kind={kind!r}: HF ViT export needs 'vit' or 'vit_mae'"
        )
    cfg = parse_model_config(model)
    for ok, what in (
        (cfg.pool == "cls", f"pool={cfg.pool!r} (HF ViT reads the cls token)"),
        (
            cfg.num_heads * cfg.head_dim == cfg.d_model,
            f"num_heads*head_dim={cfg.num_heads * cfg.head_dim} (HF ViT: d_model="
            f"{cfg.d_model})",
        ),
        (
            kind == "vit"
            or cfg.decoder_heads * cfg.decoder_head_dim == cfg.decoder_d_model,
            f"decoder_heads*decoder_head_dim={cfg.decoder_heads * cfg.decoder_head_dim}"
            f" (HF ViTMAE: decoder_d_model={cfg.decoder_d_model})",
        ),
    ):
        if not ok:
            raise FormatError(f"cannot express {what} as an HF ViT model")
    hf = {
        "model_type": kind,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": _HF_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
        "qkv_bias": True,
    }
    if kind == "vit_mae":
        objective = dict(objective or {})
        hf.update(
            architectures=["ViTMAEForPreTraining"],
            decoder_hidden_size=cfg.decoder_d_model,
            decoder_num_hidden_layers=cfg.decoder_layers,
            decoder_num_attention_heads=cfg.decoder_heads,
            decoder_intermediate_size=cfg.decoder_mlp_dim,
            mask_ratio=objective.get("mask_ratio", 0.75),
            norm_pix_loss=bool(objective.get("norm_pix_loss", True)),
        )
        return hf
    hf.update(architectures=["ViTModel"], encoder_stride=cfg.patch_size)
    if cfg.num_classes:
        names = list(label_names) or [f"LABEL_{i}" for i in range(cfg.num_classes)]
        if len(names) != cfg.num_classes:
            raise FormatError(
                f"{len(names)} label names for num_classes={cfg.num_classes}"
            )
        hf.update(
            architectures=["ViTForImageClassification"],
            id2label={str(i): name for i, name in enumerate(names)},
            label2id={name: i for i, name in enumerate(names)},
        )
    return hf


def label_names_from_hf(hf: Mapping[str, Any], num_classes: int) -> list[str]:
    """Class names by id from an HF config's id2label ("0", "1", ... keys)."""
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()}
    return [id2label.get(i, str(i)) for i in range(num_classes)]


def config_fields(
    model: Mapping[str, Any],
    hf: Mapping[str, Any],
    processor: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The fmjax config groups of an imported ViT / MAE beside `model`:
    `image_processor` (`image_processor_from_hf` of the preprocessor_config.json
    dict `processor`, None without one), `data` (mean, std, and label_names
    for a classifier) and, for a MAE, `objective` (mask_ratio, norm_pix_loss
    from the HF config `hf`)."""
    processor = image_processor_from_hf(processor, model["image_size"])
    data = {"mean": processor["image_mean"], "std": processor["image_std"]}
    if model.get("num_classes"):
        data["label_names"] = label_names_from_hf(hf, model["num_classes"])
    fields = {"image_processor": processor, "data": data}
    if model["kind"] == "vit_mae":
        fields["objective"] = {
            "name": "mae",
            "mask_ratio": hf.get("mask_ratio", 0.75),
            "norm_pix_loss": bool(hf.get("norm_pix_loss", False)),
        }
    return fields


def _fixed_tables(cfg) -> dict[str, np.ndarray]:
    """{HF name: [1, 1+P, W] table} of the 2-D sin-cos tables (zero cls row) a
    model with fixed positions computes rather than stores."""

    def table(width):
        rows = sincos2d_positions(cfg.image_size // cfg.patch_size, width)
        return np.concatenate([np.zeros((1, width), np.float32), rows])[None]

    if cfg.kind == "vit_mae":
        return {
            PREFIX + _ENCODER_TABLE: table(cfg.d_model),
            _DECODER_TABLE: table(cfg.decoder_d_model),
        }
    return {_ENCODER_TABLE: table(cfg.d_model)} if cfg.position == "sincos2d" else {}


def params_from_hf(
    weights: Mapping[str, np.ndarray],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    model: Mapping[str, Any],
    num_in: Mapping[tuple[str, ...], int],
    source: str = "HF ViT weights",
    qkv_bias: bool = True,
) -> dict[tuple[str, ...], np.ndarray]:
    """Flat {path: float32 array} of a model with `model` config and param
    `shapes` from `normalise_names`d HF `weights`; `num_in`: each kernel's
    input dims; without `qkv_bias` (HF config qkv_bias=False) the query, key
    and value biases are zeros. A missing tensor, one that maps nowhere, or a
    fixed position table other than fmjax's raises FormatError naming it (and
    `source`)."""
    from fmjax.models.registry import model_config as parse_model_config

    cfg = parse_model_config(model)
    flat, missing, used = {}, [], set()
    for path, shape in shapes.items():
        name = tensor_name(path)
        if name not in weights and not qkv_bias and _QKV_BIAS.search(name):
            flat[path] = np.zeros(shape, np.float32)
            continue
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        x = np.asarray(weights[name], np.float32)
        if path[-1] == "cls":  # fold HF's position 0 into the token
            table = weights.get(name.replace("cls_token", "position_embeddings"))
            _check_shape(name, x, shape, path)
            x = x if table is None else x + np.asarray(table, np.float32)[:, :1]
        elif path[-1] == "position_embed":
            _check_shape(name, x, (1, shape[0] + 1, shape[1]), path)
            x = x[0, 1:]
        elif path[-1] == "mask_token":
            _check_shape(name, x, shape, path)
        elif path[-2:] == ("patch_embed", "kernel"):
            patch, channels = cfg.patch_size, cfg.channels
            _check_shape(name, x, (shape[1], channels, patch, patch), path)
            x = x.transpose(2, 3, 1, 0).reshape(shape)
        else:
            x = to_fmjax(name, x, path, shape, num_in.get(path, 1))
        flat[path] = np.ascontiguousarray(x, np.float32)
    for name, want in _fixed_tables(cfg).items():
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        got = np.asarray(weights[name], np.float32)
        _check_shape(name, got, want.shape, (name,))
        # The encoder's row 0 went into cls above; the decoder's must be zero.
        rows = slice(1, None) if name.endswith(_ENCODER_TABLE) else slice(None)
        diff = float(np.abs(got[:, rows] - want[:, rows]).max())
        if diff > _TABLE_ATOL:
            raise FormatError(
                f"{source}: {name} is not MAE's fixed 2-D sin-cos table with a zero "
                f"cls row (max difference {diff:.3g} from fmjax's "
                f"sincos2d_positions); fmjax's MaskedAutoencoder computes that "
                f"table and cannot hold another (a ViTMAEForPreTraining built "
                f"from a config in transformers 5.x leaves its tables at zero)"
            )
    unused = sorted(n for n in set(weights) - used if not IGNORED.fullmatch(n))
    if missing or unused:
        raise FormatError(
            f"{source} do not match an fmjax {cfg.kind} of its config.json: missing "
            f"tensors {missing}; tensors with no fmjax param {unused}"
        )
    return flat


def hf_from_params(
    flat: Mapping[tuple[str, ...], np.ndarray],
    model: Mapping[str, Any],
    num_in: Mapping[tuple[str, ...], int],
) -> dict[str, np.ndarray]:
    """HF tensors (float32) of a fmjax ViT's or MAE's flat {path: array}:
    ViTModel names, `vit.`-prefixed beside `classifier.*` with a classifier;
    ViTMAEForPreTraining names for a MAE; fixed position tables included."""
    from fmjax.models.registry import model_config as parse_model_config

    cfg = parse_model_config(model)
    tensors = dict(_fixed_tables(cfg))
    for path, value in flat.items():
        x = np.asarray(value, np.float32)
        if path[-1] == "position_embed":
            x = np.concatenate([np.zeros_like(x[:1]), x])[None]
        elif path[-2:] == ("patch_embed", "kernel"):
            patch, channels = cfg.patch_size, cfg.channels
            x = x.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)
        elif path[-1] not in ("cls", "mask_token"):
            x = to_hf(x, path, num_in.get(path, 1))
        tensors[tensor_name(path)] = np.ascontiguousarray(x, np.float32)
    if cfg.kind == "vit" and cfg.num_classes:
        tensors = {
            n if n.startswith(CLASSIFIER) else PREFIX + n: x for n, x in tensors.items()
        }
    return tensors
