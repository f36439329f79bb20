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
    # Data parallel: every chip sums the f32 gradients of >= 1M params with the
    # other three (all-reduce, or reduce-scatter + all-gather).
    reduced = report["collectives"]["all-reduce"]["bytes"]
    reduced += report["collectives"]["reduce-scatter"]["bytes"]
    assert reduced >= 4 * 1_000_000
    times = {k: report[f"{k}_s"] for k in ("compute", "hbm", "communication")}
    assert report["communication_s"] == (
        report["ici_bytes_per_chip"] / report["ici_bandwidth"]
    )
    assert report["roofline_step_s"] == max(times.values()) == times[report["bound"]]


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
    """2048 rows of 512 tokens per chip, the logits and attention scores whole
    (4.2 G and 1.1 G f32 values a chip). With the default chunking the same step
    fits (14.4 of 16 GiB), but compiling its loops takes this machine ~40 s."""
    args = ["compile", "--config", "configs/gpt_lm.py:tiny", "--topology", "v5e:2x2"]
    args += ["--config.data.batch_size=8192", "--config.data.seq_len=512"]
    args += ["--config.model.max_logits_elements=0"]
    args += ["--config.model.max_attention_elements=0"]
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


def test_collectives_are_read_from_the_compiled_hlo_with_exact_bytes():
    """A program on the 8 CPU devices (a 2 x 4 mesh) with collectives of known
    sizes: `collective_stats` finds each in the optimised HLO with the bytes
    its shapes give, five times for the one in a 5-step loop."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fmjax.aot import collective_stats

    mesh = jax.make_mesh((2, 4), ("i", "j"))
    both = ("i", "j")

    def step(x_c, y_rc, z_rc):  # per device: f32[256], f32[16, 4], f32[128, 4]
        total = jax.lax.psum(x_c, both)  # 8 chips: 1 KiB
        row = jax.lax.psum(x_c[:64], "j")  # 4 chips: 256 B
        gathered = jax.lax.all_gather(y_rc, both, tiled=True)  # -> f32[128, 4]
        scattered = jax.lax.psum_scatter(z_rc, both, tiled=True)  # -> f32[16, 4]
        shifted = jax.lax.ppermute(y_rc, "j", [(k, (k + 1) % 4) for k in range(4)])
        # Each step's all-reduce reads the last one's result: it stays in the loop.
        looped = jax.lax.fori_loop(
            0, 5, lambda _, c: c + jax.lax.psum(jnp.sin(c), both), x_c
        )
        return total + looped + jnp.sum(row), gathered, scattered + shifted

    spec = P(both)
    fn = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3)
    )
    shaped = lambda *s: jax.ShapeDtypeStruct(  # noqa: E731
        s, jnp.float32, sharding=NamedSharding(mesh, spec)
    )
    hlo = fn.lower(shaped(8 * 256), shaped(8 * 16, 4), shaped(8 * 128, 4)).compile()
    text = hlo.as_text()
    stats = collective_stats(text, num_devices=8)
    # XLA:TPU prints no known_trip_count: the loop's `i < 5` says the same.
    assert '"known_trip_count":{"n":"5"}' in text
    untold = text.replace('"known_trip_count":{"n":"5"}', '"known_trip_count":{}')
    assert collective_stats(untold, num_devices=8) == stats

    ring = lambda n: (n - 1) / n  # noqa: E731
    # all-reduce: 1 KiB over 8 chips, once and 5 times in the loop; 256 B over 4.
    assert stats["all-reduce"]["bytes"] == 1024 + 5 * 1024 + 256
    assert stats["all-reduce"]["ici_bytes"] == 2 * (6 * 1024 * ring(8) + 256 * ring(4))
    assert stats["all-reduce"]["count"] >= 3  # XLA may combine the first two
    # all-gather: 8 shards of 256 B into 2 KiB; each chip sends 7 shards' worth.
    assert stats["all-gather"] == {"count": 1, "bytes": 2048, "ici_bytes": 7 * 256}
    # reduce-scatter: 2 KiB reduced into 256 B shards; 7 partial shards sent.
    assert stats["reduce-scatter"] == {
        "count": 1,
        "bytes": 2048,
        "ici_bytes": 7 * 256,
    }
    # collective-permute: each chip sends its 256 B block once.
    assert stats["collective-permute"] == {"count": 1, "bytes": 256, "ici_bytes": 256}
    assert stats["all-to-all"]["count"] == 0
