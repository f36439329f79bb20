"""HF BERT and GPT-2 directories <-> fmjax TextEncoder / TextDecoder: config,
safetensors weights, tokenizer. `load_hf_model`, `hf_to_fmjax` and `fmjax_to_hf`
pick the model by config.json's model_type ("bert" or "gpt2") or by the fmjax
model's kind ("encoder" or "decoder").

An HF BERT directory holds `config.json` (model_type "bert"), `model.safetensors`
(BertModel names, or BertForMaskedLM / BertForPreTraining names under `bert.`)
and a WordPiece tokenizer (`tokenizer.json` and/or `vocab.txt`). Only safetensors
and JSON are read; a pickled `pytorch_model.bin` is refused, never unpickled.

fmjax's TextEncoder has no pooler (BertModel's dense+tanh over [CLS]) and no
next-sentence head, so importing ignores `pooler.*`, `cls.seq_relationship.*`
(which reads the pooler) and the `embeddings.position_ids` buffer; any other
tensor that maps nowhere, or a param with no tensor, is an error naming it.
Exporting writes no pooler: `transformers.AutoModel.from_pretrained` then reports
the pooler as newly initialised (random), so use `last_hidden_state`, not
`pooler_output`.

An HF GPT-2 directory holds `config.json` (model_type "gpt2"), `model.safetensors`
(GPT2Model names, or GPT2LMHeadModel names under `transformer.`, with or without
the tied `lm_head.weight`) and a byte-level BPE tokenizer (`tokenizer.json`, or
`vocab.json` + `merges.txt`; `fmjax.data.bpe`). Exporting a decoder writes a
GPT2LMHeadModel directory.

An HF ViT directory holds `config.json` (model_type "vit": ViTModel or
ViTForImageClassification; "vit_mae": ViTMAEForPreTraining),
`model.safetensors` and optionally `preprocessor_config.json`, whose resize,
rescale and normalisation `fmjax.load(dir).embed_images` repeats (without it,
ViTImageProcessor's defaults). Importing gives a ViT (kind "vit", learned
positions, cls readout, the classifier as its head) or a MaskedAutoencoder
(kind "vit_mae"; mask_ratio and norm_pix_loss go to `config.objective`);
exporting writes those HF classes and a preprocessor_config.json.

Name, config and layout mapping live in `fmjax.convert.bert`,
`fmjax.convert.gpt2`, `fmjax.convert.vit` and `fmjax.convert.clip` (HF CLIP
directories <-> DualEncoder, whose I/O lives there too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save

from fmjax import storage
from fmjax.config import base_config, to_json
from fmjax.convert import gpt2, vit, vit_images
from fmjax.convert.bert import (
    IGNORED,
    TIED,
    hf_config_from_model,
    hf_name_for,
    model_config_from_hf,
    tensor_name,
    to_fmjax,
    to_hf,
)
from fmjax.convert.sentence_transformers import embedding_fields
from fmjax.data.tokenizer import Tokenizer, load_tokenizer
from fmjax.errors import FormatError
from fmjax.export import find_export, flatten_params, load_export, refuse_pickles
from fmjax.models.axes import kernel_num_in
from fmjax.models.registry import param_axes

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
WEIGHTS_INDEX_FILENAME = "model.safetensors.index.json"
PREPROCESSOR_FILENAME = "preprocessor_config.json"
# config.json model_type -> the fmjax model kind it converts to.
MODEL_TYPES = {"bert": "encoder", "gpt2": "decoder", "clip": "dual_encoder"}
MODEL_TYPES.update(vit.MODEL_TYPES)
__all__ = [
    "fmjax_to_hf",
    "hf_name_for",
    "hf_to_fmjax",
    "import_fields",
    "is_hf_directory",
    "load_hf_bert",
    "load_hf_gpt2",
    "load_hf_model",
    "load_hf_vit",
    "read_hf_weights",
    "save_hf_bert",
    "save_hf_gpt2",
    "save_hf_model",
    "save_hf_vit",
]


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is an HF model directory (a config.json with a model_type)."""
    config_path = os.path.join(os.fspath(path), CONFIG_FILENAME)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _param_shapes(model_config: Mapping[str, Any]) -> dict[tuple[str, ...], tuple]:
    """Flat {path: shape} of the TextEncoder's params (eval_shape: nothing built)."""
    from fmjax.models.registry import abstract_model_params

    abstract = nn.unbox(abstract_model_params(model_config))
    return {k: v.shape for k, v in traverse_util.flatten_dict(abstract).items()}


def _num_in(model_config, path: tuple[str, ...]) -> int:
    """Input dims of a kernel, from its logical axes (1 for any other param)."""
    if path[-1] != "kernel":
        return 1
    return kernel_num_in(param_axes(model_config)["/".join(path)], "/".join(path))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except TypeError:  # bfloat16, which NumPy lacks: read through JAX instead
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v, np.float32) for k, v in load_jax(path).items()}


def read_hf_weights(directory: str) -> dict[str, np.ndarray]:
    """HF tensors by name, without a `bert.` prefix (legacy LayerNorm gamma/beta
    renamed weight/bias); reads model.safetensors or a sharded index."""
    index_path = os.path.join(directory, WEIGHTS_INDEX_FILENAME)
    if os.path.isfile(os.path.join(directory, WEIGHTS_FILENAME)):
        files = [WEIGHTS_FILENAME]
    elif os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        refuse_pickles(directory)
        raise FileNotFoundError(
            f"no {WEIGHTS_FILENAME} (or {WEIGHTS_INDEX_FILENAME}) in {directory!r}; "
            f"fmjax reads HF weights from safetensors only"
        )
    weights = {}
    for file in files:
        for name, value in _read_safetensors(os.path.join(directory, file)).items():
            name = name.removeprefix("bert.")
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
            if name in weights:
                raise FormatError(f"{directory}: tensor {name!r} appears twice")
            weights[name] = value
    return weights


def _read_hf_config(directory: str) -> dict[str, Any]:
    if not is_hf_directory(directory):
        raise FileNotFoundError(
            f"{directory!r} is not an HF model directory: expected a {CONFIG_FILENAME} "
            f"with a model_type"
        )
    with open(os.path.join(directory, CONFIG_FILENAME), encoding="utf-8") as f:
        return json.load(f)


def _load_tokenizer_for(directory: str, model_config: Mapping[str, Any]) -> Tokenizer:
    """The directory's tokenizer, refused when it has more ids than the model."""
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model_config["vocab_size"]:
        raise FormatError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"the model's vocab_size={model_config['vocab_size']}"
        )
    return tokenizer


def load_hf_model(
    directory: str | os.PathLike,
) -> tuple[dict, dict, Tokenizer | None]:
    """(model config dict, params, tokenizer) of an HF BERT, GPT-2, ViT,
    ViTMAE or CLIP directory, picked by its config.json's model_type
    (`load_hf_bert`, `load_hf_gpt2`, `load_hf_vit`: no tokenizer, None;
    `fmjax.convert.clip_directory.load_hf_clip`)."""
    directory = os.fspath(directory)
    model_type = _read_hf_config(directory).get("model_type")
    if model_type == "bert":
        return load_hf_bert(directory)
    if model_type == "gpt2":
        return load_hf_gpt2(directory)
    if model_type in vit.MODEL_TYPES:
        return (*load_hf_vit(directory), None)
    if model_type == "clip":
        from fmjax.convert import clip_directory

        return clip_directory.load_hf_clip(directory)[:3]
    raise FormatError(
        f"HF model_type={model_type!r} in {directory}: fmjax converts model_type "
        f"'bert' (BertModel / BertForMaskedLM), 'gpt2' (GPT2Model / "
        f"GPT2LMHeadModel), 'vit' (ViTModel / ViTForImageClassification), "
        f"'vit_mae' (ViTMAEForPreTraining) and 'clip' (CLIPModel) checkpoints"
    )


def load_hf_vit(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(model config dict, params) of an HF ViT or ViTMAE directory: a ViT
    (kind "vit", with a classifier when the checkpoint has `classifier.*`) or
    a MaskedAutoencoder (kind "vit_mae"), float32 NumPy params in fmjax's
    layout (`fmjax.convert.vit`). The pooler is ignored; any other tensor that
    maps nowhere, a missing one, or a MAE position table other than MAE's
    sin-cos raises FormatError naming it."""
    directory = os.fspath(directory)
    hf_config = _read_hf_config(directory)
    kind = vit.model_config_from_hf(hf_config)["kind"]  # refuse before I/O
    weights = vit.normalise_names(read_hf_weights(directory), kind)
    classes = weights.get("classifier.weight", np.zeros((0,))).shape[0]
    model_config = vit.model_config_from_hf(hf_config, num_classes=classes)
    shapes = _param_shapes(model_config)
    num_in = {path: _num_in(model_config, path) for path in shapes}
    source = f"{directory}/{WEIGHTS_FILENAME}"
    qkv_bias = bool(hf_config.get("qkv_bias", True))
    flat = vit.params_from_hf(weights, shapes, model_config, num_in, source, qkv_bias)
    return model_config, traverse_util.unflatten_dict(flat)


def import_fields(directory: str, model_config: Mapping[str, Any]) -> dict:
    """The fmjax config groups an HF import sets beside `model`: a text
    model's `pooling`, `max_seq_length` and `normalize` (sentence-transformers'
    modules, `embedding_fields`); an image model's preprocessing, labels
    and objective from its config.json and preprocessor_config.json
    (`vit.config_fields`); a CLIP's image_processor
    (`clip_directory.config_fields`)."""
    if model_config["kind"] == "dual_encoder":
        from fmjax.convert import clip_directory

        return clip_directory.config_fields(directory, model_config)
    if model_config["kind"] not in vit.MODEL_TYPES.values():
        return embedding_fields(directory)
    path = os.path.join(directory, PREPROCESSOR_FILENAME)
    processor = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            processor = json.load(f)
    return vit.config_fields(model_config, _read_hf_config(directory), processor)


def load_hf_gpt2(directory: str | os.PathLike) -> tuple[dict, dict, Tokenizer]:
    """(model config dict, params, tokenizer) of an HF GPT-2 directory.

    Params are a nested dict of float32 NumPy arrays in TextDecoder's layout
    (`fmjax.convert.gpt2`); the tokenizer is byte-level BPE. A config key fmjax
    cannot compute, a missing tensor or one that maps nowhere raises FormatError
    naming it.
    """
    directory = os.fspath(directory)
    # Refuse an unsupported config before reading any weights.
    model_config = gpt2.model_config_from_hf(_read_hf_config(directory))
    weights = gpt2.strip_prefix(read_hf_weights(directory))
    flat = gpt2.params_from_hf(
        weights, _param_shapes(model_config), f"{directory}/{WEIGHTS_FILENAME}"
    )
    tokenizer = _load_tokenizer_for(directory, model_config)
    return model_config, traverse_util.unflatten_dict(flat), tokenizer


def load_hf_bert(directory: str | os.PathLike) -> tuple[dict, dict, Tokenizer]:
    """(model config dict, params, tokenizer) of an HF BERT directory.

    Params are a nested dict of float32 NumPy arrays in TextEncoder's layout; the
    config has `mlm_head=True` only when the checkpoint has `cls.predictions.*`.
    The pooler, the NSP head and `embeddings.position_ids` are ignored (fmjax has
    no pooler); any other unused or missing tensor raises with its name.
    """
    directory = os.fspath(directory)
    hf_config = _read_hf_config(directory)
    model_config_from_hf(hf_config, mlm_head=False)  # refuse non-BERT before I/O
    weights = read_hf_weights(directory)
    mlm_head = any(name.startswith("cls.predictions.") for name in weights)
    model_config = model_config_from_hf(hf_config, mlm_head=mlm_head)
    flat, missing, used = {}, [], set()
    for path, shape in _param_shapes(model_config).items():
        name = tensor_name(path)
        if name not in weights:
            missing.append(name)
            continue
        used.add(name)
        num_in = _num_in(model_config, path)
        flat[path] = to_fmjax(name, weights[name], path, shape, num_in)
    for copy, original in TIED.items():
        if copy in weights:
            used.add(copy)
            if original in weights and not np.array_equal(
                weights[copy], weights[original]
            ):
                raise FormatError(
                    f"{directory}: {copy} differs from {original}; fmjax ties the "
                    f"MLM decoder to them and cannot hold an untied copy"
                )
    unused = sorted(n for n in set(weights) - used if not IGNORED.fullmatch(n))
    if missing or unused:
        raise FormatError(
            f"{directory}/{WEIGHTS_FILENAME} does not match an fmjax BERT of its "
            f"config.json: missing tensors {missing}; tensors with no fmjax param "
            f"{unused}"
        )
    tokenizer = _load_tokenizer_for(directory, model_config)
    return model_config, traverse_util.unflatten_dict(flat), tokenizer


def _flat_matching_params(
    model_config: Mapping[str, Any], params
) -> tuple[dict[tuple[str, ...], tuple], dict[tuple[str, ...], np.ndarray]]:
    """({path: shape} the config expects, {path: array} of `params`), refused
    when the paths or shapes differ."""
    expected = _param_shapes(model_config)
    flat = {tuple(k.split(".")): v for k, v in flatten_params(nn.unbox(params)).items()}
    missing = sorted(".".join(p) for p in set(expected) - set(flat))
    extra = sorted(".".join(p) for p in set(flat) - set(expected))
    if missing or extra:
        raise FormatError(
            f"params do not match the {model_config.get('kind')} config: missing "
            f"{missing}, unexpected {extra} (merge LoRA or other adapters into the "
            f"kernels before exporting)"
        )
    for path, shape in expected.items():
        if flat[path].shape != shape:
            raise FormatError(
                f"param {'.'.join(path)} has shape {flat[path].shape}; expected {shape}"
            )
    return expected, flat


def _write_hf_directory(
    directory: str, hf_config: dict, tensors: dict, tokenizer: Tokenizer | None
) -> str:
    storage.makedirs(directory)
    storage.write_text(
        storage.join(directory, CONFIG_FILENAME),
        json.dumps(hf_config, indent=2, sort_keys=True) + "\n",
    )
    storage.write_bytes(
        storage.join(directory, WEIGHTS_FILENAME),
        save(tensors, metadata={"format": "pt"}),
    )
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def save_hf_model(
    directory: str | os.PathLike,
    model_config: Mapping[str, Any],
    params,
    tokenizer: Tokenizer,
) -> str:
    """`save_hf_bert` for an encoder, `save_hf_gpt2` for a decoder."""
    kind = dict(model_config).get("kind")
    if kind == "encoder":
        return save_hf_bert(directory, model_config, params, tokenizer)
    if kind == "decoder":
        return save_hf_gpt2(directory, model_config, params, tokenizer)
    raise FormatError(
        f"model.kind={kind!r}: fmjax exports encoders (as HF BERT) and decoders "
        f"(as HF GPT-2) only"
    )


def save_hf_gpt2(
    directory: str | os.PathLike,
    model_config: Mapping[str, Any],
    params,
    tokenizer: Tokenizer,
) -> str:
    """Writes an HF GPT2LMHeadModel directory (config.json, model.safetensors in
    float32, the tokenizer's files) that `transformers.AutoModelForCausalLM`
    loads; bos/eos/pad ids in config.json are the tokenizer's. Returns
    `directory`."""
    directory = os.fspath(directory)
    hf_config = gpt2.hf_config_from_model(
        model_config, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    )
    _, flat = _flat_matching_params(model_config, params)
    tensors = gpt2.hf_from_params(flat)
    return _write_hf_directory(directory, hf_config, tensors, tokenizer)


def save_hf_bert(
    directory: str | os.PathLike,
    model_config: Mapping[str, Any],
    params,
    tokenizer: Tokenizer,
) -> str:
    """Writes an HF BERT directory (config.json, model.safetensors in float32, the
    tokenizer's files) that `transformers.AutoModel.from_pretrained` loads.

    With an MLM head the layout is BertForMaskedLM's (`bert.` prefix + `cls.*`,
    load it with AutoModelForMaskedLM), else BertModel's. No pooler is written:
    transformers initialises it randomly and says so. Returns `directory`.
    """
    directory = os.fspath(directory)
    hf_config = hf_config_from_model(model_config, tokenizer.pad_id)
    expected, flat = _flat_matching_params(model_config, params)
    prefix = "bert." if hf_config["architectures"] == ["BertForMaskedLM"] else ""
    tensors = {}
    for path in expected:
        name = tensor_name(path)
        tensors[name if name.startswith("cls.") else prefix + name] = to_hf(
            flat[path], path, _num_in(model_config, path)
        )
    return _write_hf_directory(directory, hf_config, tensors, tokenizer)


def save_hf_vit(directory: str | os.PathLike, config: Mapping[str, Any], params) -> str:
    """Writes an HF ViTModel (ViTForImageClassification with a classifier) or
    ViTMAEForPreTraining directory (config.json, model.safetensors in float32,
    preprocessor_config.json) of a fmjax ViT or MAE run: its `config` gives
    the model, data.label_names, objective (mask_ratio, norm_pix_loss) and the
    preprocessing (an import's image_processor, else data.mean / data.std of
    [0, 1] pixels at the model's size). A projection head is left out; no
    pooler is written (`fmjax.convert.vit`). Returns `directory`."""
    directory = os.fspath(directory)
    model_config = dict(config["model"])
    data = dict(config.get("data") or {})
    hf_config = vit.hf_config_from_model(
        model_config, data.get("label_names") or (), config.get("objective")
    )
    backbone = {**model_config, "proj_layers": 0, "prototypes": 0}
    params = {k: v for k, v in nn.unbox(params).items() if k not in vit.NOT_EXPORTED}
    expected, flat = _flat_matching_params(backbone, params)
    num_in = {path: _num_in(backbone, path) for path in expected}
    tensors = vit.hf_from_params(flat, backbone, num_in)
    processor = config.get("image_processor") or vit_images.image_processor_from_hf(
        {"image_mean": data.get("mean", (0.5,)), "image_std": data.get("std", (0.5,))},
        model_config["image_size"],
    )
    _write_hf_directory(directory, hf_config, tensors, None)
    storage.write_text(
        storage.join(directory, PREPROCESSOR_FILENAME),
        json.dumps(vit_images.hf_image_processor(processor), indent=2, sort_keys=True)
        + "\n",
    )
    return directory


def hf_to_fmjax(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> str:
    """Converts an HF BERT, GPT-2, ViT, ViTMAE or CLIP directory into an fmjax export
    directory (readable by `fmjax.load` and `fmjax.export.load_export`);
    returns `dst_dir`."""
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    model_config, params, tokenizer = load_hf_model(src_dir)
    config = base_config()
    config.name = "hf_import"
    config.model = model_config
    for key, value in import_fields(src_dir, model_config).items():
        if isinstance(value, dict) and key in config:
            config[key].update(value)
        else:
            config[key] = value
    if tokenizer is not None:
        config.data.vocab_size = tokenizer.vocab_size
    storage.makedirs(dst_dir)
    storage.write_bytes(
        storage.join(dst_dir, WEIGHTS_FILENAME), save(flatten_params(params))
    )
    storage.write_text(storage.join(dst_dir, CONFIG_FILENAME), to_json(config))
    if tokenizer is not None:
        tokenizer.save(dst_dir)
    return dst_dir


def fmjax_to_hf(src: str | os.PathLike, dst_dir: str | os.PathLike) -> str:
    """Converts an fmjax encoder, decoder, ViT, MAE or dual encoder (workdir
    or export directory) into an HF BERT, GPT-2 (GPT2LMHeadModel), ViT, ViTMAE
    or CLIP directory; returns `dst_dir`."""
    src = os.fspath(src)
    params, config = load_export(src)
    model_config = dict(config.get("model") or {})
    kind = model_config.get("kind")
    if kind not in MODEL_TYPES.values():
        raise FormatError(
            f"{src} holds a model of kind={kind!r}; fmjax-to-hf converts encoders "
            f"(to HF BERT), decoders (to HF GPT-2), ViTs and MAEs (to HF ViT and "
            f"ViTMAE) and dual encoders (to HF CLIP) only"
        )
    if kind == "dual_encoder":
        from fmjax.convert.clip_directory import save_hf_clip

        return save_hf_clip(dst_dir, config, params, load_tokenizer(find_export(src)))
    if kind in vit.MODEL_TYPES.values():
        return save_hf_vit(dst_dir, config, params)
    if kind == "decoder":  # refuse what GPT-2 cannot express before more I/O
        gpt2.hf_config_from_model(model_config)
    tokenizer = load_tokenizer(find_export(src))
    return save_hf_model(dst_dir, model_config, params, tokenizer)
