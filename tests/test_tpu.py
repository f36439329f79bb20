"""TPU planning without a TPU: `fmjax compile` on a topology description, and the
Cloud TPU scripts' exact gcloud commands (dry runs)."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
from conftest import REPO

from fmjax import cli

SCRIPT = os.path.join(REPO, "tpu_scripts", "tpu.py")
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the [tpu] extra) has wheels for Linux x86-64 only",
)


@needs_libtpu
def test_compile_reports_hbm_flops_and_roofline(capsys):
    args = ["compile", "--config", "configs/gpt_lm.py:tiny", "--topology", "v5e:2x2"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["chips"] == 4 and report["topology"] == "v5e:2x2"
    assert report["hbm_capacity_bytes"] == 16 * 2**30
    parts = ("hbm_argument_bytes", "hbm_temp_bytes", "hbm_output_bytes")
    assert all(report[k] > 0 for k in parts)
    assert (
        report["hbm_total_bytes"]
        == sum(report[k] for k in parts) - report["hbm_alias_bytes"]
    )
    # The state (params + AdamW moments, f32) is an argument on every chip: data
    # parallelism replicates it, so arguments hold at least 3x the params.
    assert report["hbm_argument_bytes"] >= 3 * 4 * 1_000_000
    assert report["xla_flops_per_chip"] > report["model_flops_per_step"] / 4 * 0.5
    assert 0 < report["roofline_mfu"] <= 1 and report["fits"]


@needs_libtpu
def test_compile_plans_a_vit_in_images(capsys):
    """ViT configs plan like the text ones; throughput counts images and the
    FLOPs are XLA's count of the whole step (MAE: encoder on 25% of patches)."""
    args = ["compile", "--config", "configs/vit_mae.py:tiny", "--topology", "v5e:2x2"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["unit"] == "images" and report["images_per_step"] == 16
    assert report["model_flops_per_step"] == 4 * report["xla_flops_per_chip"] > 0
    assert report["fits"] and 0 < report["roofline_mfu"] <= 1


@needs_libtpu
def test_compile_refuses_a_config_that_does_not_fit(capsys):
    args = ["compile", "--config", "configs/gpt_lm.py:tiny", "--topology", "v5e:2x2"]
    args += ["--config.data.batch_size=8192", "--config.data.seq_len=512"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit on v5e:2x2" in err and "16.00 GiB HBM" in err, err
    assert "exceeds available HBM" in err, err  # the compiler's own numbers


def test_bad_topology_is_named(capsys):
    args = ["compile", "--config", "configs/gpt_lm.py:tiny", "--topology", "v9:2x2"]
    assert cli.main(args) == 2
    assert "topology 'v9:2x2': expected KIND:AxB" in capsys.readouterr().err


def dry(*args):
    out = subprocess.run(
        [sys.executable, SCRIPT, args[0], "--dry-run", *args[1:]],
        capture_output=True,
        text=True,
        check=True,
    )
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_create_commands():
    (cmd,) = dry("create", "--name", "fm", "--zone", "us-east5-a", "--type", "v4-32")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "fm" in cmd and "--accelerator-type=v4-32" in cmd
    assert "--version=tpu-ubuntu2204-base" in cmd
    (cmd,) = dry(
        "create", "--name", "fm", "--zone", "z", "--type", "v5litepod-8", "--queued"
    )
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-id=fm" in cmd and "--runtime-version=v2-alpha-tpuv5-lite" in cmd


def test_setup_launch_stop_delete_run_on_every_worker():
    (setup,) = dry("setup", "--name", "fm", "--zone", "z", "--repo", "https://x/f.git")
    assert "--worker=all" in setup and "pip install" in setup[-1]
    (launch,) = dry(
        "launch",
        "--name",
        "fm",
        "--zone",
        "z",
        "--workdir",
        "gs://b/run",
        "--",
        "--config",
        "configs/gpt_lm.py:base",
        "--config.train.steps=10",
    )
    assert launch[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in launch
    remote = launch[-1].removeprefix("--command=")
    assert "fmjax train --workdir gs://b/run --config configs/gpt_lm.py:base" in remote
    assert "--coordinator" not in remote  # JAX finds it on a TPU VM
    (stop,) = dry("stop", "--name", "fm", "--zone", "z")
    assert "pkill -TERM" in stop[-1]
    (delete,) = dry("delete", "--name", "fm", "--zone", "z", "--queued")
    assert delete[:6] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "fm",
    ]


def test_watch_stops_a_stalled_job(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 5, "split": "train"}\n')
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "watch",
            "--name",
            "fm",
            "--zone",
            "z",
            "--workdir",
            str(workdir),
            "--stall-minutes",
            "0.005",
            "--poll-seconds",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "no progress past step 5" in out.stdout
    assert "pkill -TERM" in out.stdout  # the stop command it ran
    assert time.time() - start < 30
