"""The README's sharding, multi-process and TPU-planning commands run as written
(see tests/test_readme.py), and its two-process run (2 processes x 4 CPU devices
on localhost) gives what its 8-device run of the same config gives."""

import argparse
import os

import numpy as np
import pytest
from conftest import run_readme_commands
from safetensors.numpy import load_file
from test_readme import PARTS

from fmjax import cli
from fmjax.config import ConfigError
from fmjax.train.metrics import read_metrics


def _curve(workdir, split):
    return [
        (r["step"], r["loss"]) for r in read_metrics(workdir) if r["split"] == split
    ]


def test_scale_commands_run(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    run_readme_commands(PARTS["scale"], tiny_bert_dir, data_dir, tmp_path, monkeypatch)
    # runs/fsdp: one process, a 2x2x2 mesh; runs/two: two processes, data=8.
    one, two = str(tmp_path / "runs" / "fsdp"), str(tmp_path / "runs" / "two")
    # Each process wrote its own data-iterator state into the shared checkpoint.
    data_4 = os.path.join(two, "checkpoints", "4", "data")
    written = sorted(f for f in os.listdir(data_4) if f.startswith("process_"))
    assert written == ["process_0-of-2.json", "process_1-of-2.json"]
    # Training batches are the same for any process count; eval packs each
    # process's documents into rows separately, which moves its loss a little.
    for split, rtol in (("train", 1e-4), ("eval", 1e-3)):
        got, want = _curve(two, split), _curve(one, split)
        assert want and [s for s, _ in got] == [s for s, _ in want], split
        np.testing.assert_allclose(
            [v for _, v in got], [v for _, v in want], rtol=rtol, err_msg=split
        )
    expected = load_file(os.path.join(one, "export", "model.safetensors"))
    got = load_file(os.path.join(two, "export", "model.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        # atol: the attention key bias has no true gradient; it only collects noise.
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5)


def _flags(coordinator="", num_processes=0, process_id=-1):
    return argparse.Namespace(
        coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )


def test_processes_start_from_flags_or_jax_variables(monkeypatch):
    """What jax.distributed.initialize is called with (the README run above
    starts two real processes from the flags)."""
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda *args: calls.append(args))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    cli.init_distributed(_flags())
    assert calls == []  # one process
    cli.init_distributed(_flags("127.0.0.1:1234", 2, 0))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    cli.init_distributed(_flags())
    assert calls == [("127.0.0.1:1234", 2, 0), ("10.0.0.2:8476", 4, 3)]
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ConfigError, match="--process-id"):
        cli.init_distributed(_flags())
