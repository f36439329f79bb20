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
