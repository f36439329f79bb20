"""Experiment configs: `configs/NAME.py:VARIANT` files, `--config.a.b=v` overrides.

A config file defines `get_config(variant: str) -> ml_collections.ConfigDict`.
Overrides are checked against the config: an unknown key or a value of the wrong
type raises `ConfigError` naming the key, the value and what was expected, before
any compute starts.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import os
from collections.abc import Sequence

import ml_collections

from fmjax.errors import FmjaxError

ConfigDict = ml_collections.ConfigDict


class ConfigError(FmjaxError, ValueError):
    """A config that cannot run: the message names the bad key or value."""


def _import_config_module(path: str):
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(__file__), os.pardir, path)
        if os.path.isfile(here):
            path = here
        else:
            raise ConfigError(f"config file {path!r} does not exist")
    name = "fmjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(variant)")
    return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py:variant` and applies `a.b=v` overrides (with or without the
    leading `--config.`)."""
    path, _, variant = spec.partition(":")
    module = _import_config_module(path)
    if not variant:  # the file's default: get_config's default argument
        default = inspect.signature(module.get_config).parameters.get("variant")
        if default is None or default.default is inspect.Parameter.empty:
            raise ConfigError(f"{path} has no default variant; name one: {path}:NAME")
        variant = default.default
        spec = f"{path}:{variant}"
    variants = getattr(module, "VARIANTS", None)
    if variants is not None and variant not in variants:
        raise ConfigError(
            f"unknown variant {variant!r} of {path}; expected one of {list(variants)}"
        )
    try:
        config = module.get_config(variant)
    except KeyError as e:
        raise ConfigError(f"unknown variant {variant!r} of {path}: {e}") from None
    config.config_spec = spec
    apply_overrides(config, overrides)
    return config


def _keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = prefix + key
        keys.append(full)
        if isinstance(value, ConfigDict):
            keys += _keys(value, full + ".")
    return keys


def _parse_value(key: str, text: str, expected: type | None):
    """Parses `text` as a value of the type the config already holds for `key`."""
    if expected is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected a bool (true/false)")
    if expected is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(
                f"--config.{key}={text!r}: expected an int, like the default"
            ) from None
    if expected is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected a float") from None
    if expected is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if expected in (tuple, list) and not isinstance(value, tuple | list):
        if not isinstance(value, str):
            raise ConfigError(
                f"--config.{key}={text!r}: expected a {expected.__name__}"
            )
        value = (value,)  # one string: a one-item tuple (e.g. lora_targets)
    if expected in (tuple, list):
        return expected(value)
    return value


# Other names of a key (DESIGN.md calls init.model init.from).
ALIASES = {"init.from": "init.model"}


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `key=value` overrides in place; every key must already exist."""
    for override in overrides:
        item = override.removeprefix("--").removeprefix("config.")
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key = ALIASES.get(key, key)
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, ConfigDict) or part not in node:
                _unknown_key(config, ".".join(parents[: depth + 1]))
            node = node[part]
        if not isinstance(node, ConfigDict) or leaf not in node:
            _unknown_key(config, key)
        if isinstance(node[leaf], ConfigDict):
            raise ConfigError(
                f"--config.{key} is a group; set one of its keys: "
                f"{sorted(node[leaf].keys())}"
            )
        expected = node.get_type(leaf)
        value = _parse_value(key, text, expected)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"--config.{key}={text!r}: {e}") from None


def _unknown_key(config: ConfigDict, key: str):
    close = difflib.get_close_matches(key, _keys(config), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))


DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("type_vocab", None),
    ("position", None),
    ("classes", None),
    ("patch", None),
    ("decoder_embed", None),
    ("proj", None),
    ("prototypes", "tensor"),
)


def base_config() -> ConfigDict:
    """The groups every training config shares; experiment files fill `model`,
    `objective` and sizes."""
    c = ConfigDict()
    c.name = ""
    c.data = dict(
        name="bbc_news",
        data_dir="",  # empty: $FMJAX_DATA_DIR or ~/.cache/fmjax/datasets
        train_split="train",
        eval_split="validation",
        text_key="text",
        seq_len=128,
        batch_size=32,  # global batch, split over processes and devices
        vocab_size=8000,  # SentencePiece vocabulary trained on the train split
        # The SentencePiece model type trained on the train split (unigram, bpe,
        # char, word), or a tokenizer file (.model) or directory to use as is.
        tokenizer="unigram",
        shuffle_seed=0,
        # Independent pipelines that make up the global batch (it must divide
        # batch_size). Process counts that divide it read the same global batches:
        # a run depends on its config and seed, not on how many hosts read it.
        # 0: one per process (then the batches change with the process count).
        num_shards=8,
    )
    c.optimizer = dict(
        learning_rate=1e-3,
        warmup_steps=50,
        schedule="cosine",  # cosine | constant
        end_learning_rate_ratio=0.1,
        weight_decay=0.01,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        grad_clip_norm=1.0,
        grad_accum_steps=1,
    )
    c.train = dict(
        steps=300,
        seed=0,
        log_every=10,
        eval_every=100,  # 0: evaluate only at the end
        eval_batches=0,  # 0: the whole eval split
        # The task's evaluators (frozen features, zero-shot, retrieval, a test
        # split) every this many steps as well as at the end; 0: at the end only.
        evaluators_every=0,
        progress=True,
    )
    c.checkpoint = dict(every=100, keep=3, async_save=True)
    # host_devices: the XLA devices `fmjax train` makes of a CPU host
    # (`fmjax.host_devices`): 0, fmjax decides (2 where only speed changes);
    # 1, one (a step too small to gain from two).
    c.mesh = dict(
        data=-1, fsdp=1, tensor=1, num_devices=0, host_devices=0, rules=DEFAULT_RULES
    )
    # A pretrained model to start from (`init.from` is the same key): an fmjax
    # workdir or export, or an HF directory. Empty: random init.
    c.init = dict(model="", pretrained=True)
    c.adapt = adapt_config()
    return c


VIT_VARIANTS = ("tiny", "small", "base")


def vit_config(variant: str) -> ConfigDict:
    """base_config() for a ViT on images, the shapes every vision config shares:
      tiny   a 2-layer d=32 ViT on 28x28 grey images in 7x7 patches (tests)
      small  a 4-layer d=128 ViT in 4x4 patches (CPU studies)
      base   ViT-B/16 shapes: 224x224 RGB in 16x16 patches, bfloat16, fsdp
    Data: Fashion-MNIST (Debian's dataset-fashion-mnist), imagenet2012 for
    base; the `features` group (frozen-feature evaluation after training and
    in `fmjax eval`); tiny's short schedule. Objective files set the rest."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VIT_VARIANTS}")
    c = base_config()
    c.model = dict(
        kind="vit", image_size=28, patch_size=7, channels=1, d_model=32,
        num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, position="sincos2d",
        pool="cls", dtype="float32", param_dtype="float32", remat="none",
        patch_init="xavier",
    )  # fmt: skip
    c.data.update(
        name="fashion_mnist",
        eval_split="test",
        batch_size=64,
        mean=(0.286,),  # Fashion-MNIST's pixel mean and std
        std=(0.353,),
    )
    c.train.update(steps=2000, eval_every=500)
    # k-NN (all labels and knn_fractions of them), few-shot ridge per shot count
    # over seeds, and a linear probe of the encoder's frozen features on the
    # labels of train_examples training images (0: all).
    c.features = dict(
        evaluate=True, train_examples=10_000, test_examples=0,
        shots=(1, 5, 10, 25), seeds=(0, 1, 2), knn_fractions=(0.01,),
    )  # fmt: skip
    if variant == "tiny":
        c.data.update(batch_size=16)
        c.train.update(steps=20, eval_every=10, eval_batches=2)
        c.optimizer.update(warmup_steps=2)
    elif variant == "small":
        c.model.update(
            patch_size=4, d_model=128, num_layers=4, num_heads=4, head_dim=32,
            mlp_dim=512,
        )  # fmt: skip
    else:
        c.model.update(
            image_size=224, patch_size=16, channels=3, d_model=768, num_layers=12,
            num_heads=12, head_dim=64, mlp_dim=3072, dtype="bfloat16",
        )  # fmt: skip
        c.data.update(
            name="imagenet2012", eval_split="validation", batch_size=4096,
            num_shards=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )  # fmt: skip
        c.mesh.update(data=1, fsdp=-1)
    return c


def adapt_config(method: str = "full") -> ConfigDict:
    """How a run adapts its model (fmjax.adapt.methods): full training, or an
    adapter over the frozen model (lora, qlora, prefix, prompt)."""
    from fmjax.adapt.lora import DEFAULT_TARGETS

    return ConfigDict(
        dict(
            method=method,
            # lora / qlora
            lora_rank=8,
            lora_alpha=16.0,
            lora_dropout=0.1,
            lora_targets=DEFAULT_TARGETS,  # or "all-linear", or regexes of paths
            # qlora: NF4 base
            quant_block_size=64,
            double_quant=True,
            quantize_embeddings=False,  # True: embedding tables as NF4 too
            compute_dtype="float32",  # dtype the NF4 kernels are dequantised to
            # prompt tuning
            prompt_tokens=20,
            prompt_init="vocab",  # vocab | random
            # prefix tuning
            prefix_tokens=10,
            prefix_reparam=False,  # True: K/V from an MLP over T embeddings
            prefix_hidden=512,
            # params trained besides the adapter (PEFT's modules_to_save)
            train_patterns=(),
            # method=full: params kept frozen (LiT: a locked tower, "text/.*")
            freeze=(),
        )
    )
