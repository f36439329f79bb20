"""`fmjax train` makes 2 XLA devices of a CPU host where that changes only speed."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

from fmjax import host_devices
from fmjax.config import ConfigError, load_config

CORES = 2


def _config(*overrides):
    return load_config("configs/gpt_lm.py:tiny", [f"--config.{o}" for o in overrides])


def test_a_data_parallel_run_on_a_cpu_host_gets_two_devices():
    assert host_devices.training_devices(_config(), {}, CORES) == 2
    assert host_devices.training_devices(_config(), {"XLA_FLAGS": "--a=1"}, 8) == 2


@pytest.mark.parametrize(
    "environ",
    [
        {"FMJAX_HOST_DEVICES": "1"},
        {"FMJAX_HOST_DEVICES": "8"},
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        {"JAX_NUM_CPU_DEVICES": "1"},
        {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"},
        {"TPU_WORKER_HOSTNAMES": "host0,host1"},
    ],
)
def test_a_count_of_the_users_own_or_several_processes_keep_jaxs_devices(environ):
    assert host_devices.training_devices(_config(), environ, CORES) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ("mesh.num_devices=1",),
        ("mesh.data=1", "mesh.fsdp=-1"),
        ("mesh.data=-1", "mesh.tensor=2"),
        ("data.batch_size=31", "data.num_shards=1"),
        ("optimizer.grad_accum_steps=32",),  # 32 rows: micro-batches of 1
    ],
)
def test_other_meshes_and_batches_that_do_not_split_keep_one_device(overrides):
    assert host_devices.training_devices(_config(*overrides), {}, CORES) == 0


def test_a_config_may_keep_one_device_and_other_counts_are_refused():
    assert host_devices.training_devices(_config("mesh.host_devices=1"), {}, 8) == 0
    for spec in ("configs/vit_mae.py:small", "configs/clip.py:small"):
        assert host_devices.training_devices(load_config(spec), {}, CORES) == 0
    bad = _config("mesh.host_devices=2")
    for environ, cores in (({}, CORES), ({"FMJAX_HOST_DEVICES": "1"}, 1)):
        with pytest.raises(ConfigError, match=r"mesh.host_devices=2: expected 0"):
            host_devices.training_devices(bad, environ, cores)


def test_one_core_or_large_pretrained_weights_keep_one_device(tmp_path, monkeypatch):
    assert host_devices.training_devices(_config(), {}, 1) == 0
    weights = tmp_path / "pretrained"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\0" * 4096)
    config = _config(f"init.model={weights}")
    assert host_devices.training_devices(config, {}, CORES) == 2
    monkeypatch.setattr(host_devices, "MAX_PRETRAINED_BYTES", 4096)
    assert host_devices.training_devices(config, {}, CORES) == 0
    remote = _config("init.model=gs://bucket/run")  # size unknown: not split
    assert host_devices.training_devices(remote, {}, CORES) == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a host of one core stays whole")
def test_the_train_command_trains_on_two_cpu_devices(data_dir, tmp_path):
    """A fresh `fmjax train` process (no device count in its environment)
    builds its mesh over 2 CPU devices and says so in summary.json."""
    env = {k: v for k, v in os.environ.items() if k != "FMJAX_HOST_DEVICES"}
    env["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
    )
    workdir = tmp_path / "run"
    overrides = tiny_overrides(
        data_dir, **{"mesh.data": -1, "train.steps": 2, "train.eval_every": 0}
    )
    cmd = [sys.executable, "-m", "fmjax.cli", "train"]
    cmd += ["--config", "configs/gpt_lm.py:tiny", "--workdir", str(workdir), *overrides]
    out = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "over 2 cpu devices" in out.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}


def test_a_split_steps_flops_count_every_devices_share():
    """`fmjax bench train`'s MFU divides XLA's FLOPs of the step: its cost
    analysis counts one device's share, so a step split over 2 devices
    must report the same total as on one (the gradient sum adds 2% to a tiny
    ViT's step)."""
    from fmjax.bench import fmjax_train_step, random_train_batch
    from fmjax.bench_vision import step_flops

    flops = {}
    for devices in (1, 2):
        config = load_config(
            "configs/vit_supervised.py:tiny", [f"--config.mesh.num_devices={devices}"]
        )
        _, compiled, _ = fmjax_train_step(config, random_train_batch(config))
        flops[devices] = step_flops(compiled)
    assert flops[2] == pytest.approx(flops[1], rel=0.05)
