"""LoRA adapters <-> HF PEFT adapter directories (`adapter_model.safetensors` and
`adapter_config.json`), so an fmjax adapter loads with
`peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(base), dir)`
and a PEFT LoRA adapter trained in torch loads into fmjax.

Layout: PEFT adds `scale * lora_B @ lora_A` (lora_A [r, in], lora_B [out, r]) to an
nn.Linear weight [out, in]; fmjax adds `scale * lora_a @ lora_b` (lora_a [in, r],
lora_b [r, out]) to the kernel viewed as [in, out], then reshapes it to the kernel's
einsum shape. `fmjax.convert.bert.to_fmjax` / `to_hf` map a weight to a kernel
by a transpose and a row-major reshape of [in, out] (e.g. attention out [H, K, D]
is [H*K, D] with in = h * K + k, HF's head-major order), and LoRA splits the
kernel into [in, out] the same way: both read the split from the kernel's
logical axes (`fmjax.models.axes.kernel_num_in`). So the
adapter matrices are transposed and nothing else: lora_A = lora_a.T,
lora_B = lora_b.T, with the same scale alpha / r.

Tensor names are `base_model.model.<HF module>.lora_{A,B}.weight` (what PEFT 0.21
writes for a BertModel); `target_modules` lists, per adapted module, the shortest
dotted suffix of its HF name that selects no other projection (PEFT matches a
target t against a module name n when n == t or n ends with "." + t), so the
default query/value adapter gives ["query", "value"] and ALL_LINEAR gives
["intermediate.dense", "key", "output.dense", "query", "value"] ("output.dense"
covers attention.output.dense too; a bare "dense" would also adapt the pooler).
Without the base params, the other projections are taken to be those of layers
0..(the highest adapted layer) plus the pooler: an adapter on only the first
layers of a deeper model then names leaves that PEFT also matches in the later
layers, which it gives zero-initialised (no-op) adapters.

Only safetensors is read or written; a pickled `adapter_model.bin` is refused,
never unpickled. Adapter tensors are stored in float32.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping

import flax.traverse_util
import numpy as np
from safetensors.numpy import load_file, save_file

from fmjax.adapt.lora import ALL_LINEAR, LoraConfig, adapters_by_module
from fmjax.convert.bert import hf_name_for
from fmjax.errors import FormatError
from fmjax.export import refuse_pickles
from fmjax.models.axes import matrix_shape

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLED_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
# HF BertModel projections with no fmjax param (candidates for a target's match).
EXTRA_HF_MODULES = ("pooler.dense",)
_TENSOR = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")

HfName = Callable[[tuple[str, ...]], str]

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_peft", "save_peft"]


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def _target_modules(adapted: set[str], universe: set[str]) -> list[str]:
    """Shortest dotted suffix per adapted module selecting no other module."""
    others = universe - adapted
    targets = set()
    for name in adapted:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            target = ".".join(parts[i:])
            if not any(_matches(target, other) for other in others):
                targets.add(target)
                break
    return sorted(targets)


def _guessed_universe(modules: list[tuple[str, ...]], hf_name: HfName) -> set[str]:
    """Every ALL_LINEAR projection of layers 0..max adapted, plus EXTRA_HF_MODULES."""
    layers = [
        int(m[0].removeprefix("layers_"))
        for m in modules
        if m and re.fullmatch(r"layers_\d+", m[0])
    ]
    names = set(EXTRA_HF_MODULES)
    for i in range(max(layers) + 1 if layers else 0):
        for target in ALL_LINEAR:
            try:
                names.add(hf_name((f"layers_{i}", *target.split("/")[:-1])))
            except KeyError:
                pass
    return names


def save_peft(
    directory: str | os.PathLike,
    lora_params,
    lora_config: LoraConfig,
    *,
    base_model_name_or_path: str = "",
    hf_name: HfName = hf_name_for,
) -> str:
    """Writes `lora_params` as a PEFT LoRA adapter directory; returns its path.

    `hf_name` maps an fmjax module path (tuple) to the HF module name (no `bert.`
    prefix). Dropout and alpha go into the config; the adapter's own shapes are
    checked against `lora_config.rank`.
    """
    directory = os.fspath(directory)
    adapters = adapters_by_module(lora_params)
    if not adapters:
        raise FormatError("save_peft: lora_params holds no adapters")
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, tuple[str, ...]] = {}
    for module, (a_IR, b_RO) in adapters.items():
        path = tuple(module.split("/"))
        name = hf_name(path)
        if name in names:
            raise FormatError(
                f"fmjax modules {'/'.join(names[name])} and {module} both map to HF "
                f"module {name!r}"
            )
        names[name] = path
        r = lora_config.rank
        if a_IR.ndim != 2 or b_RO.ndim != 2 or a_IR.shape[1] != r or b_RO.shape[0] != r:
            raise FormatError(
                f"LoRA {module}: lora_a {tuple(a_IR.shape)}, lora_b "
                f"{tuple(b_RO.shape)}; expected [in, {r}] and [{r}, out] for "
                f"LoraConfig.rank={r}"
            )
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(a_IR, np.float32).T
        )
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(b_RO, np.float32).T
        )
    universe = _guessed_universe(list(names.values()), hf_name) | set(names)
    alpha = lora_config.alpha
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_bias": False,
        "lora_dropout": float(lora_config.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora_config.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": _target_modules(set(names), universe),
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory!r}")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise FormatError(
            f"{path}: peft_type={config.get('peft_type')!r}; fmjax loads 'LORA' only"
        )
    for key, ok in (
        ("fan_in_fan_out", False),
        ("bias", "none"),
        ("use_dora", False),
        ("use_rslora", False),
        ("lora_bias", False),
    ):
        if config.get(key, ok) != ok:
            raise FormatError(f"{path}: {key}={config[key]!r}; fmjax supports {ok!r}")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise FormatError(
                f"{path}: {key}={config[key]!r}; fmjax supports one rank and alpha "
                f"for every module and no modules_to_save"
            )
    return config


def load_peft(
    directory: str | os.PathLike,
    fmjax_params,
    *,
    axes: Mapping[str, tuple],
    hf_name: HfName = hf_name_for,
) -> tuple[dict, LoraConfig]:
    """(lora_params, LoraConfig) of a PEFT LoRA adapter directory, for the model
    whose params are `fmjax_params` with logical axes `axes`
    (`fmjax.models.param_axes(model_config)`); use them with
    `fmjax.adapt.lora.wrap_matmuls` or `merge`.

    The config's targets are the shortest "/"-aligned suffix patterns that select
    exactly the adapted kernels of `fmjax_params`.
    """
    directory = os.fspath(directory)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        refuse_pickles(directory)
        raise FileNotFoundError(
            f"no {ADAPTER_WEIGHTS} in {directory!r}; fmjax reads PEFT adapters from "
            f"safetensors only"
        )
    config = _read_config(directory)
    rank = config.get("r")
    flat = flax.traverse_util.flatten_dict(fmjax_params)
    kernels: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for path, leaf in flat.items():
        if path[-1] != "kernel":
            continue
        try:
            name = hf_name(path[:-1])
        except KeyError:
            continue
        kernels[name] = (path, tuple(np.shape(leaf)))
    found: dict[str, dict[str, np.ndarray]] = {}
    for tensor, value in load_file(weights_path).items():
        match = _TENSOR.fullmatch(tensor.removeprefix(PREFIX))
        module = match["module"].removeprefix("bert.") if match else None
        if not tensor.startswith(PREFIX) or module not in kernels:
            raise FormatError(
                f"{weights_path}: tensor {tensor!r} is not a LoRA weight of a "
                f"projection in the fmjax params; expected "
                f"'{PREFIX}<HF module>.lora_A.weight' / '.lora_B.weight'"
            )
        found.setdefault(module, {})[match["ab"]] = value
    if not found:
        raise FormatError(f"{weights_path} holds no LoRA tensors")
    lora_flat = {}
    for module, ab in sorted(found.items()):
        path, shape = kernels[module]
        if set(ab) != {"A", "B"}:
            raise FormatError(f"{weights_path}: {module} lacks lora_A or lora_B")
        n_in, n_out = matrix_shape(axes["/".join(path)], shape, "/".join(path))
        got = (ab["A"].shape, ab["B"].shape)
        if got != ((rank, n_in), (n_out, rank)):
            raise FormatError(
                f"{weights_path}: {module} lora_A {got[0]}, lora_B {got[1]}; "
                f"expected {(rank, n_in)} and {(n_out, rank)} for r={rank!r} and "
                f"fmjax kernel {'/'.join(path)} {shape}"
            )
        lora_flat[path[:-1] + ("lora_a",)] = np.asarray(ab["A"], np.float32).T.copy()
        lora_flat[path[:-1] + ("lora_b",)] = np.asarray(ab["B"], np.float32).T.copy()
    adapted = {"/".join(kernels[m][0]) for m in found}
    lora_config = LoraConfig(
        rank=rank,
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=_fmjax_targets(adapted, {"/".join(p) for p, _ in kernels.values()}),
    )
    return flax.traverse_util.unflatten_dict(lora_flat), lora_config


def _fmjax_targets(adapted: set[str], kernels: set[str]) -> tuple[str, ...]:
    """Shortest "/"-aligned suffix (at least e.g. attention/query/kernel) per
    adapted kernel path that matches no other kernel (`fmjax.adapt.masks` rule)."""
    others = kernels - adapted
    targets = set()
    for path in adapted:
        parts = path.split("/")
        for i in range(max(len(parts) - 3, 0), -1, -1):
            target = "/".join(parts[i:])
            if not any(o == target or o.endswith("/" + target) for o in others):
                targets.add(re.escape(target))
                break
    return tuple(sorted(targets))


def export_run_to_peft(workdir: str | os.PathLike, directory: str | os.PathLike) -> str:
    """`fmjax convert lora-to-peft`: the LoRA adapters of a `lora`/`qlora` run's
    export as a PEFT adapter directory for its base (`init.model`).

    PEFT puts them on the HF BertModel, or for a decoder on the HF
    GPT2LMHeadModel (see "GPT-2" below); the run's classifier head (pooling +
    dense) has no BertModel counterpart and stays in the fmjax export. A QLoRA
    adapter was trained against the NF4-rounded base: on the f32 base its
    outputs differ by the quantisation error.
    """
    from fmjax.adapt.methods import Adaptation
    from fmjax.config import ConfigDict
    from fmjax.export import is_adapter_export, load_export
    from fmjax.models.registry import model_config

    workdir = os.fspath(workdir)
    trained, config = load_export(workdir)
    method = config.get("adapt", {}).get("method", "full")
    if not is_adapter_export(workdir) or method not in ("lora", "qlora"):
        raise FormatError(
            f"{workdir!r} is a {method!r} run; lora-to-peft needs a run trained with "
            "adapt.method=lora or qlora"
        )
    adaptation = Adaptation.from_config(
        ConfigDict(config["adapt"]), model_config(config["model"])
    )
    base = config.get("init", {}).get("model", "")
    if config["model"].get("kind") == "decoder":
        return save_peft_gpt2(
            directory,
            trained[method],
            adaptation.lora,
            config["model"]["d_model"],
            base_model_name_or_path=base,
        )
    return save_peft(
        directory,
        trained[method],
        adaptation.lora,
        base_model_name_or_path=base,
    )


# --- GPT-2 --------------------------------------------------------------------------
#
# GPT-2 computes query, key and value with one Conv1D (`attn.c_attn`, [D, 3D]),
# so fmjax's separate query/value adapters become one PEFT adapter on c_attn:
# lora_A stacks their A matrices ([n*r, D] for n adapted projections) and
# lora_B places each B in its third of the output columns ([3D, n*r], zeros
# elsewhere), which adds exactly the same delta. That adapter's rank is n*r, so
# its alpha is n*alpha (PEFT's rank_pattern / alpha_pattern when other modules
# keep rank r), keeping the scale alpha / r. Conv1D weights are [in, out]:
# PEFT's `fan_in_fan_out` is True; lora_A / lora_B keep nn.Linear's layout.


def _gpt2_module(path: tuple[str, ...]) -> tuple[str, int | None]:
    """(GPT-2 module name under `transformer.`, third of c_attn or None)."""
    from fmjax.convert import gpt2

    name, third = gpt2.tensor_name((*path, "kernel"))
    return name.removesuffix(".weight"), third


def gpt2_peft_tensors(lora_params, lora_config: LoraConfig, d_model: int):
    """({HF module: (lora_A [r', in], lora_B [out, r'])}, {module: r'/r}) of
    fmjax decoder adapters, c_attn's three projections merged (see above)."""
    merged: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, (a_IR, b_RO) in adapters_by_module(lora_params).items():
        name, third = _gpt2_module(tuple(module.split("/")))
        a_IR, b_RO = np.asarray(a_IR, np.float32), np.asarray(b_RO, np.float32)
        if third is None:
            out[name] = (a_IR.T.copy(), b_RO.T.copy())
        else:
            merged.setdefault(name, {})[third] = (a_IR, b_RO)
    multiples = {}
    for name, parts in merged.items():
        rank = lora_config.rank
        a_RI = np.concatenate([parts[t][0].T for t in sorted(parts)])
        b_OR = np.zeros((3 * d_model, rank * len(parts)), np.float32)
        for j, third in enumerate(sorted(parts)):
            rows = slice(third * d_model, (third + 1) * d_model)
            b_OR[rows, j * rank : (j + 1) * rank] = parts[third][1].T
        # Contiguous: safetensors writes an array's memory as it lies.
        out[name] = (np.ascontiguousarray(a_RI), b_OR)
        multiples[name] = len(parts)
    return out, multiples


def save_peft_gpt2(
    directory: str | os.PathLike,
    lora_params,
    lora_config: LoraConfig,
    d_model: int,
    *,
    base_model_name_or_path: str = "",
) -> str:
    """Writes decoder adapters as a PEFT LoRA adapter for HF GPT2LMHeadModel."""
    directory = os.fspath(directory)
    modules, multiples = gpt2_peft_tensors(lora_params, lora_config, d_model)
    if not modules:
        raise FormatError("save_peft_gpt2: lora_params holds no adapters")
    tensors = {}
    for name, (a_RI, b_OR) in modules.items():
        tensors[f"{PREFIX}transformer.{name}.lora_A.weight"] = a_RI
        tensors[f"{PREFIX}transformer.{name}.lora_B.weight"] = b_OR
    # Targets: "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj".
    targets = {".".join(name.split(".")[-2:]) for name in modules}
    rank, alpha = lora_config.rank, float(lora_config.alpha)
    rank_pattern, alpha_pattern = {}, {}
    if set(modules) == set(multiples) and len(set(multiples.values())) == 1:
        (n,) = set(multiples.values())  # only c_attn, alike in every layer
        rank, alpha = n * rank, n * alpha
    else:
        for name, n in multiples.items():
            rank_pattern[re.escape(name)] = n * rank
            alpha_pattern[re.escape(name)] = n * alpha
    config = {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": True,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora_config.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def merge_peft_gpt2(directory: str | os.PathLike, params, model_config) -> dict:
    """`params` (an fmjax decoder's, from HF GPT-2) with the PEFT LoRA adapter
    in `directory` folded into its kernels: W += (alpha / r) * (B A)^T per
    module, c_attn's columns split into query, key and value."""
    from fmjax.convert import gpt2
    from fmjax.models.registry import param_axes

    directory = os.fspath(directory)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        refuse_pickles(directory)
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory!r}")
    with open(os.path.join(directory, ADAPTER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    for key, ok in (("peft_type", "LORA"), ("use_dora", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise FormatError(f"{directory}: {key}={config[key]!r}; fmjax needs {ok!r}")
    found: dict[str, dict[str, np.ndarray]] = {}
    for tensor, value in load_file(weights_path).items():
        match = _TENSOR.fullmatch(tensor.removeprefix(PREFIX))
        if not tensor.startswith(PREFIX) or match is None:
            raise FormatError(f"{weights_path}: {tensor!r} is not a LoRA weight")
        module = match["module"].removeprefix(gpt2.PREFIX)
        found.setdefault(module, {})[match["ab"]] = np.asarray(value, np.float32)
    flat = flax.traverse_util.flatten_dict(params)
    by_name: dict[str, list[tuple[tuple[str, ...], int | None]]] = {}
    for path in flat:
        if path[-1] == "kernel":
            try:
                name, third = _gpt2_module(path[:-1])
            except KeyError:
                continue
            by_name.setdefault(name, []).append((path, third))
    axes = param_axes(model_config)
    out = dict(flat)
    for module, ab in sorted(found.items()):
        if module not in by_name or set(ab) != {"A", "B"}:
            raise FormatError(
                f"{weights_path}: {module!r} is not a GPT-2 projection of this "
                "model, or lacks lora_A / lora_B"
            )
        rank = _pattern(config.get("rank_pattern", {}), module, config["r"])
        alpha = _pattern(config.get("alpha_pattern", {}), module, config["lora_alpha"])
        delta_IO = (ab["B"] @ ab["A"]).T * (float(alpha) / rank)  # [in, out]
        for path, third in by_name[module]:
            kernel = np.asarray(out[path], np.float32)
            n_in, n_out = matrix_shape(axes["/".join(path)], kernel.shape, path)
            part = delta_IO
            if third is not None:
                part = delta_IO[:, third * n_out : (third + 1) * n_out]
            if part.shape != (n_in, n_out):
                raise FormatError(
                    f"{weights_path}: {module} gives a [{part.shape}] update; fmjax "
                    f"kernel {'/'.join(path)} is [{n_in}, {n_out}]"
                )
            out[path] = (kernel.reshape(n_in, n_out) + part).reshape(kernel.shape)
    return flax.traverse_util.unflatten_dict(out)


def _pattern(patterns: Mapping[str, float], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name
    that equals it or ends with "." + it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default
