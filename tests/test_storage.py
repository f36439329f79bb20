"""Remote (gs://) workdirs for metrics, config and exports, on an in-memory fake
of the gs:// filesystem (fsspec's memory filesystem registered for "gs")."""

import json

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

from fmjax import storage
from fmjax.train.metrics import MetricsWriter, read_metrics


@pytest.fixture
def fake_gcs():
    for protocol in ("gs", "gcs"):  # etils.epath asks fsspec for "gcs"
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    MemoryFileSystem.store.clear()
    yield MemoryFileSystem()
    MemoryFileSystem.store.clear()
    for protocol in ("gs", "gcs"):  # back to gcsfs for later users
        _registry.pop(protocol, None)


def test_metrics_on_a_bucket_append_and_truncate(fake_gcs):
    workdir = "gs://bucket/runs/gpt"
    assert (
        storage.join(workdir, "metrics.jsonl") == "gs://bucket/runs/gpt/metrics.jsonl"
    )
    writer = MetricsWriter(workdir)  # no TensorBoard for remote workdirs
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.truncate_after(2)  # a resumed run drops what it will rewrite
    writer.write(3, "train", {"loss": 0.25})
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] == 0.25
    assert storage.exists("gs://bucket/runs/gpt/metrics.jsonl")
    assert not storage.exists("gs://bucket/runs/gpt/tensorboard")


def test_export_to_a_bucket(fake_gcs, data_dir):
    from safetensors.numpy import load

    from fmjax.config import load_config
    from fmjax.data.tokenizer import tokenizer_for
    from fmjax.export import export

    tokenizer = tokenizer_for("bbc_news", 1000, str(data_dir))
    params = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    config = load_config("configs/gpt_lm.py:tiny")
    out = export("gs://bucket/run", params, config, tokenizer)
    assert out == "gs://bucket/run/export"
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert storage.exists(f"{out}/{name}"), name
    saved = json.loads(storage.read_text(out + "/config.json"))
    assert saved["model"]["kind"] == "decoder"
    weights = load(epath.Path(out + "/model.safetensors").read_bytes())
    np.testing.assert_array_equal(weights["layer.kernel"], params["layer"]["kernel"])
    assert not storage.exists("run/export/model.safetensors")  # nothing went local


def test_eval_reads_a_bucket_workdirs_config(fake_gcs):
    """`fmjax eval --workdir gs://...` takes the run's saved config from the
    bucket, as `train` writes it (local paths only before)."""
    import argparse

    from fmjax import cli
    from fmjax.config import ConfigError, load_config, to_json

    config = load_config("configs/gpt_lm.py:tiny", ["train.steps=7"])
    storage.write_text("gs://bucket/run/config.json", to_json(config))
    args = argparse.Namespace(config=None, workdir="gs://bucket/run")
    loaded = cli._load_config(args, ["--config.train.eval_batches=3"])
    assert loaded.train.steps == 7 and loaded.train.eval_batches == 3
    with pytest.raises(ConfigError, match="gs://bucket/none/config.json"):
        cli._load_config(
            argparse.Namespace(config=None, workdir="gs://bucket/none"), []
        )
