"""Two processes x 4 CPU devices on localhost give the single-process result."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO, tiny_overrides
from safetensors.numpy import load_file

from fmjax.config import load_config
from fmjax.train.loop import train
from fmjax.train.metrics import read_metrics


def _overrides(data_dir):
    return tiny_overrides(
        data_dir,
        **{
            "train.steps": 8,
            "train.log_every": 1,
            "train.eval_every": 4,
            "checkpoint.every": 4,
            "mesh.fsdp": 2,
            "mesh.data": -1,
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve(workdir, split):
    return [
        (r["step"], r["loss"]) for r in read_metrics(workdir) if r["split"] == split
    ]


def test_two_processes_match_one(data_dir, tmp_path):
    single = str(tmp_path / "single")
    train(load_config("configs/gpt_lm.py:tiny", _overrides(data_dir)), single)

    multi = str(tmp_path / "multi")
    port = _free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    command = [sys.executable, "-m", "fmjax.cli", "train"]
    command += ["--config", "configs/gpt_lm.py:tiny", "--workdir", multi]
    command += _overrides(data_dir)
    coordinator = f"127.0.0.1:{port}"
    # Process 0 gets flags; process 1 the standard JAX environment variables.
    launches = [
        (
            command
            + ["--coordinator", coordinator, "--num-processes", "2"]
            + ["--process-id", "0"],
            env,
        ),
        (
            command,
            dict(
                env,
                JAX_COORDINATOR_ADDRESS=coordinator,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID="1",
            ),
        ),
    ]
    procs = [
        subprocess.Popen(
            args,
            cwd=REPO,
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, e in launches
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    # Each process wrote its own data-iterator state into the shared checkpoint.
    data_dir_8 = os.path.join(multi, "checkpoints", "8", "data")
    written = sorted(f for f in os.listdir(data_dir_8) if f.startswith("process_"))
    assert written == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    for split in ("train", "eval"):
        got, want = _curve(multi, split), _curve(single, split)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose(
            [v for _, v in got], [v for _, v in want], rtol=1e-4, err_msg=split
        )
    expected = load_file(os.path.join(single, "export", "model.safetensors"))
    got = load_file(os.path.join(multi, "export", "model.safetensors"))
    for key in expected:
        # atol: the attention key bias has no true gradient; it only collects noise.
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5)
