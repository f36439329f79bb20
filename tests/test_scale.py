"""Sharded training: the same loss curve on any mesh, checkpoints that restore on
any mesh, and full-size presets initialised abstractly with every param sharded."""

import math
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_overrides
from safetensors.numpy import load_file

from fmjax import sharding as shd
from fmjax.checkpoint import Checkpointer
from fmjax.config import load_config
from fmjax.models import build_model
from fmjax.models.text import count_params
from fmjax.tasks import task_for
from fmjax.train.loop import train
from fmjax.train.metrics import read_metrics
from fmjax.train.run import init_state
from fmjax.train.state import make_optimizer

MESHES = {  # (data, fsdp, tensor, num_devices)
    "1 device": (1, 1, 1, 1),
    "data=8": (8, 1, 1, 0),
    "fsdp=8": (1, 8, 1, 0),
    "2x2x2": (2, 2, 2, 0),
    "fsdp=4,tensor=2": (1, 4, 2, 0),
}


def _config(data_dir, mesh, **extra):
    data, fsdp, tensor, num_devices = mesh
    values = {
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "mesh.data": data,
        "mesh.fsdp": fsdp,
        "mesh.tensor": tensor,
        "mesh.num_devices": num_devices,
        **extra,
    }
    return load_config("configs/gpt_lm.py:tiny", tiny_overrides(data_dir, **values))


def _train_losses(workdir):
    return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def single_device_curve(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mesh_1"))
    config = _config(data_dir, MESHES["1 device"], **{"train.steps": 20})
    train(config, workdir)
    return _train_losses(workdir)


@pytest.mark.parametrize("mesh", [m for m in MESHES if m != "1 device"])
def test_every_mesh_gives_the_single_device_loss_curve(
    mesh, single_device_curve, data_dir, tmp_path
):
    train(_config(data_dir, MESHES[mesh], **{"train.steps": 20}), str(tmp_path))
    losses = np.array(_train_losses(str(tmp_path)))
    reference = np.array(single_device_curve)
    assert len(losses) == len(reference) == 20
    assert reference[-1] < reference[0] - 0.3  # the curve really moves
    np.testing.assert_allclose(losses, reference, rtol=1e-4)


def _abstract(config, mesh):
    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    tx, _ = make_optimizer(config.train.steps, **config.optimizer)
    abstract, shardings, _ = init_state(task, model, tx, mesh)
    return abstract, shardings


def test_checkpoint_written_on_fsdp8_restores_on_other_meshes(data_dir, tmp_path):
    steps = {"train.steps": 8, "checkpoint.every": 4}
    source = str(tmp_path / "fsdp8")
    train(_config(data_dir, MESHES["fsdp=8"], **steps), source)
    final = load_file(os.path.join(source, "export", "model.safetensors"))

    states = {}
    for name in ("fsdp=8", "1 device", "2x2x2"):
        config = _config(data_dir, MESHES[name], **steps)
        mesh = shd.mesh_from_config(config.mesh)
        abstract, shardings = _abstract(config, mesh)
        ckpt = Checkpointer(source, async_save=False)
        state, data, _, _ = ckpt.restore(4, abstract, shardings)
        ckpt.close()
        leaf = state.params["layers_0"]["mlp"]["up"]["kernel"]
        assert leaf.sharding.mesh.shape == mesh.shape
        assert len(leaf.sharding.device_set) == mesh.size
        states[name] = (jax.device_get(state), data)
    reference_state, reference_data = states["fsdp=8"]
    for name, (state, data) in states.items():
        assert data == reference_data, name  # data iterator state included
        for a, b in zip(
            jax.tree.leaves(reference_state), jax.tree.leaves(state), strict=True
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)

    # Resume step 4 -> 8 on one device, then on 2x2x2: same end as fsdp=8.
    for name in ("1 device", "2x2x2"):
        workdir = str(tmp_path / name.replace(" ", "_"))
        shutil.copytree(os.path.join(source, "checkpoints"), f"{workdir}/checkpoints")
        shutil.rmtree(f"{workdir}/checkpoints/8")
        train(_config(data_dir, MESHES[name], **steps), workdir)
        resumed = load_file(os.path.join(workdir, "export", "model.safetensors"))
        for key in final:
            if key.endswith("attention.key.bias"):
                # softmax ignores a bias shared by all keys: its gradient is
                # 0 but for rounding, which Adam scales up; each side's stays
                # that noise (they differ by ~1e-6 where the sums round
                # differently, one device's fmjax.native ops against XLA's)
                assert np.abs(resumed[key]).max() < 1e-5, key
                assert np.abs(final[key]).max() < 1e-5, key
                continue
            np.testing.assert_allclose(
                resumed[key], final[key], rtol=1e-4, atol=1e-6, err_msg=key
            )


@pytest.mark.parametrize(
    "spec, expected_params",
    [
        ("configs/bert_mlm.py:base", 109_514_298),
        ("configs/gpt_lm.py:base", 124_439_808),
        ("configs/gpt_lm.py:1b", (0.95e9, 1.1e9)),
        ("configs/gpt_lm.py:8b", (7.9e9, 8.1e9)),
    ],
)
def test_full_size_presets_shard_abstractly(spec, expected_params, tmp_path):
    """eval_shape only: nothing of full size is allocated on any device."""
    config = load_config(spec, ["--config.mesh.data=1", "--config.mesh.fsdp=8"])
    mesh = shd.mesh_from_config(config.mesh)

    abstract, shardings = _abstract(config, mesh)
    params = count_params(abstract.params)
    if isinstance(expected_params, tuple):
        assert expected_params[0] < params < expected_params[1], params
    else:
        assert params == expected_params
    leaves = jax.tree.leaves(abstract.params)
    param_shardings = jax.tree.leaves(shardings.params)
    assert len(leaves) == len(param_shardings)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in param_shardings)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    per_device = shd.bytes_per_device(shardings.params, abstract.params)
    # fsdp=8 splits every matrix; only small vectors stay replicated.
    assert per_device <= 1.15 * total / 8, (per_device, total)
    state_total = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract)
    )
    state_per_device = shd.bytes_per_device(shardings, abstract)
    assert state_per_device <= 1.15 * state_total / 8
