"""Self-supervised vision objectives: SimCLR's NT-Xent and DINO's loss against
NumPy references, both over the global batch on 8 simulated devices; DINO's
teacher, centre and schedules; multi-view pipelines; runs end to end and a
DINO resume that reproduces the uninterrupted run bit for bit."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_vision import VIT, _train_tiny

from fmjax.config import ConfigError, load_config
from fmjax.data import images as image_data
from fmjax.data import sources
from fmjax.models import build_model, model_config
from fmjax.tasks import task_for
from fmjax.tasks.ssl import (
    dino_sums,
    nt_xent_sums,
    teacher_momentum,
    teacher_temperature,
)


def _log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _nt_xent_reference(z, weights, temperature):
    """SimCLR's loss written out for two views: anchor i's positive is its
    other view; candidates are every real view but itself."""
    batch = z.shape[0]
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    total, count = 0.0, 0
    for b in range(batch):
        if weights[b] == 0:
            continue
        for v in (0, 1):
            anchor = z[b, v]
            candidates, positive = [], None
            for c in range(batch):
                for w in (0, 1):
                    if weights[c] == 0 or (c, w) == (b, v):
                        continue
                    if c == b:
                        positive = len(candidates)
                    candidates.append(anchor @ z[c, w] / temperature)
            total -= _log_softmax(np.array(candidates))[positive]
            count += 1
    return total, count


def test_nt_xent_matches_a_written_out_reference_and_ignores_padding():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 2, 8)).astype(np.float32)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    sums = nt_xent_sums(jnp.asarray(z), jnp.asarray(weights), 0.2)
    total, count = _nt_xent_reference(z.astype(np.float64), weights, 0.2)
    assert float(sums["count"]) == count == 8
    np.testing.assert_allclose(float(sums["loss_sum"]), total, rtol=1e-5)
    # Padding rows count for nothing, whatever they hold.
    z[4:] = rng.normal(size=(2, 2, 8))
    again = nt_xent_sums(jnp.asarray(z), jnp.asarray(weights), 0.2)
    np.testing.assert_allclose(float(again["loss_sum"]), float(sums["loss_sum"]))
    # Identical views of distinct images: every anchor finds its positive.
    same = np.repeat(np.eye(6, 8, dtype=np.float32)[:, None], 2, axis=1)
    assert float(nt_xent_sums(same, np.ones(6), 0.1)["correct"]) == 12


def _dino_reference(student, teacher, center, weights, ts, tt):
    probs = np.exp(_log_softmax((teacher - center) / tt))
    log_q = _log_softmax(student / ts)
    total = 0.0
    for b in range(student.shape[0]):
        pairs = [
            -(probs[b, i] * log_q[b, j]).sum()
            for i in range(teacher.shape[1])
            for j in range(student.shape[1])
            if i != j
        ]
        total += weights[b] * np.mean(pairs)
    return total


def test_dino_loss_matches_a_written_out_reference():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(4, 5, 16))  # 2 global + 3 local views
    teacher = rng.normal(size=(4, 2, 16))
    center = rng.normal(size=16) * 0.1
    weights = np.array([1, 1, 1, 0.0])
    sums = dino_sums(*map(jnp.asarray, (student, teacher, center, weights)), 0.1, 0.04)
    expected = _dino_reference(student, teacher, center, weights, 0.1, 0.04)
    np.testing.assert_allclose(float(sums["loss_sum"]), expected, rtol=1e-5)
    assert float(sums["count"]) == 3 and float(sums["teacher_output_count"]) == 6
    np.testing.assert_allclose(
        sums["teacher_output_sum"], teacher[:3].sum(axis=(0, 1)), rtol=1e-5
    )


def test_losses_over_8_devices_equal_one_device():
    """Rows sharded over 8 devices meet every device's columns: the same sums
    as on one device (normalised by global counts by the caller)."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(16, 2, 8)).astype(np.float32)
    student = rng.normal(size=(16, 4, 12)).astype(np.float32)
    teacher = rng.normal(size=(16, 2, 12)).astype(np.float32)
    weights = np.ones(16, np.float32)
    weights[-3:] = 0
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def both(z, student, teacher, weights):
        center = jnp.zeros(12)
        return (
            nt_xent_sums(z, weights, 0.2),
            dino_sums(student, teacher, center, weights, 0.1, 0.04),
        )

    one = jax.jit(both)(z, student, teacher, weights)
    sharded = jax.jit(both, in_shardings=rows)(z, student, teacher, weights)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-5)


def test_dino_schedules():
    assert float(teacher_momentum(0, 100, 0.996)) == pytest.approx(0.996)
    assert float(teacher_momentum(50, 100, 0.996)) == pytest.approx(0.998)
    assert float(teacher_momentum(100, 100, 0.996)) == pytest.approx(1.0)
    assert float(teacher_temperature(0, 10, 0.04, 0.07)) == pytest.approx(0.04)
    assert float(teacher_temperature(5, 10, 0.04, 0.07)) == pytest.approx(0.055)
    assert float(teacher_temperature(20, 10, 0.04, 0.07)) == pytest.approx(0.07)


# --- views and the ViT on other sizes ----------------------------------------------


def test_multi_crop_views_are_seeded_and_resume(fashion_data):
    source = sources.load_source("fashion_mnist", "train", str(fashion_data))
    views = image_data.parse_views(
        {
            "global_views": {"count": 2, "augment": ("random_resized_crop", "flip")},
            "local_views": {"count": 3, "size": 14, "augment": ("flip",)},
        }
    )
    settings = dict(image_size=28, channels=1, batch_size=4, seed=5, views=views)
    it = image_data.make_image_iterator(source, **settings)
    first = next(it)
    assert first["global_views"].shape == (4, 2, 28, 28, 1)
    assert first["local_views"].shape == (4, 3, 14, 14, 1)
    assert first["labels"].shape == (4,) and "images" not in first
    # Two views of one image differ (each draws its own crop).
    assert not np.array_equal(first["global_views"][0, 0], first["global_views"][0, 1])
    state = it.get_state()
    want = next(it)
    again = image_data.make_image_iterator(source, **settings)
    np.testing.assert_array_equal(next(again)["local_views"], first["local_views"])
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["global_views"], want["global_views"])
    with pytest.raises(ValueError, match="data.views.v: count=0"):
        image_data.parse_views({"v": {"count": 0}})
    with pytest.raises(ValueError, match="unknown keys \\['sizes'\\]"):
        image_data.parse_views({"v": {"count": 2, "sizes": 3}})


@pytest.mark.parametrize("position", ["sincos2d", "learned"])
def test_vit_takes_smaller_crops_with_interpolated_positions(position):
    cfg = model_config({**VIT, "position": position, "proj_layers": 2,
                        "proj_hidden_dim": 16, "proj_dim": 8})  # fmt: skip
    module = build_model(cfg)
    params = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]
    small = jax.random.normal(jax.random.key(1), (3, 14, 14, 1))
    out = module.apply({"params": params}, small)
    assert out["hidden"].shape == (3, 1 + 4, 32) and out["projection"].shape == (3, 8)
    with pytest.raises(ValueError, match="multiple of patch_size=7"):
        module.apply({"params": params}, np.zeros((1, 16, 16, 1)))


# --- tasks end to end -----------------------------------------------------------------


def test_frozen_prototypes_get_no_gradient_until_released():
    config = load_config("configs/vit_dino.py:tiny", [])
    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    images = np.random.default_rng(0).normal(size=(2, 2, 28, 28, 1))
    local = np.random.default_rng(1).normal(size=(2, 2, 14, 14, 1))
    params = model.init(jax.random.key(0), images[:, 0])["params"]
    params = nn.unbox(params)
    extra = task.init_extra(params)
    batch = {"global_views": images, "local_views": local, "weights": np.ones(2)}
    loss_fn = task.loss_fn(model)
    # Move the student away from its teacher, so the loss has a gradient.
    student = jax.tree.map(lambda p: p * 1.5, params)

    @jax.jit
    def grads(extra):
        return jax.grad(
            lambda p: loss_fn(p, {}, batch, jax.random.key(2), True, extra)["loss_sum"]
        )(student)

    frozen = grads(extra)["projection"]["prototypes"]
    assert float(extra["last_layer_trainable"]) == 0.0
    assert np.all(np.asarray(frozen) == 0)
    released = grads({**extra, "last_layer_trainable": jnp.float32(1.0)})
    assert np.abs(np.asarray(released["projection"]["prototypes"])).max() > 0
    assert np.abs(np.asarray(grads(extra)["patch_embed"]["kernel"])).max() > 0


def _state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)


def _train_then_resume(config, data, tmp_path, steps=6, **extra):
    """A tiny run of `steps` steps with a checkpoint half way, and the same run
    resumed from that checkpoint; (summary, final state, resumed final state)."""
    extra = {"checkpoint.every": steps // 2, "checkpoint.async_save": False, **extra}
    workdir = str(tmp_path / "run")
    summary, _ = _train_tiny(config, workdir, data, steps=steps, **extra)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(steps)))
    os.remove(os.path.join(resumed, "summary.json"))
    _train_tiny(config, resumed, data, steps=steps, **extra)
    assert json.load(open(os.path.join(resumed, "summary.json")))["steps"] == steps
    return summary, _state(workdir, steps), _state(resumed, steps)


def _assert_same_state(final, again):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(final)[0],
        jax.tree.leaves(again),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_dino_trains_and_resumes_bit_identically(fashion_data, tmp_path):
    """The teacher and centre are checkpointed: a run resumed at step 2 ends
    with the uninterrupted run's student, teacher and centre, bit for bit."""
    summary, final, again = _train_then_resume("vit_dino", fashion_data, tmp_path, 4)
    teacher, student = final["extra"]["teacher"], final["params"]
    start = _state(str(tmp_path / "run"), 2)["extra"]["teacher"]
    # The teacher follows the student by EMA: it moved, but is not the student.
    kernel = teacher["patch_embed"]["kernel"]
    assert not np.array_equal(kernel, start["patch_embed"]["kernel"])
    assert not np.allclose(kernel, student["patch_embed"]["kernel"])
    assert np.abs(final["extra"]["center"]).max() > 0
    assert summary["features"]["knn_accuracy"] > 0.1
    _assert_same_state(final, again)


def test_simclr_trains_and_resumes_bit_identically(fashion_data, tmp_path):
    """Two mildly augmented views of 16 images a step: in 20 steps the held-out
    NT-Xent falls, to well under a uniform guess among the 31 candidates (log
    31 = 3.43; a fresh ViT already tells images apart, so it starts below).
    Resumed at step 10, the run ends with the same params and optimizer state
    (the views' iterator state came back too)."""
    mild = "('random_resized_crop(scale=(0.6, 1.0))', 'flip')"
    settings = {"data.views.views.augment": mild, "optimizer.learning_rate": 1e-3}
    summary, final, again = _train_then_resume(
        "vit_simclr", fashion_data, tmp_path, steps=20, **settings
    )
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[-1]["loss"] < min(evals[0]["loss"] - 0.1, 0.8 * np.log(31)), evals
    assert 0 <= evals[-1]["contrastive_accuracy"] <= 1
    for key in ("knn_accuracy", "linear_probe_accuracy"):
        assert 0.1 < summary["features"][key] <= 1.0, summary["features"]
    assert "extra" not in final  # no state beside the params
    _assert_same_state(final, again)


# --- a user's own images ------------------------------------------------------------


def _write_images(root, layout):
    """layout: {relative dir: [(width, height, mode)]} -> PNG/JPEG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for directory, specs in layout.items():
        os.makedirs(root / directory, exist_ok=True)
        for i, (w, h, mode) in enumerate(specs):
            channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, (h, w, channels), np.uint8).squeeze()
            suffix = "jpg" if mode == "RGB" else "png"
            Image.fromarray(pixels, mode).save(root / directory / f"{i}.{suffix}")


def test_image_folders_with_and_without_classes(tmp_path):
    _write_images(
        tmp_path / "labelled",
        {"cats": [(40, 30, "RGB"), (28, 28, "L")], "dogs": [(20, 50, "RGBA")] * 3},
    )
    info = sources.dataset_info(f"folder:{tmp_path}/labelled")
    assert info.features["label"].names == ["cats", "dogs"]
    source = sources.load_source(f"folder:{tmp_path}/labelled", "train")
    assert len(source) == 5 and [source[i]["label"] for i in range(5)] == [
        0,
        0,
        1,
        1,
        1,
    ]
    assert source[0]["image"].shape == (30, 40, 3) and source[1]["image"].shape[-1] == 1
    assert source[2]["image"].shape == (50, 20, 3)  # RGBA -> RGB
    assert len(sources.load_source(f"folder:{tmp_path}/labelled", "train[:60%]")) == 3
    assert len(sources.load_source(f"folder:{tmp_path}/labelled", "train[60%:]")) == 2
    with pytest.raises(ValueError, match=r"Unknown split 'test'.*\['train'\]"):
        sources.load_source(f"folder:{tmp_path}/labelled", "test")

    tiny = [(8, 8, "L")]
    _write_images(
        tmp_path / "split", {"train/a": tiny, "test/a": tiny, "train/b": tiny}
    )
    split = sources.dataset_info(f"folder:{tmp_path}/split")
    assert sorted(split.splits) == ["test", "train"]
    assert split.features["label"].names == ["a", "b"]

    _write_images(tmp_path / "plain", {".": [(16, 16, "RGB")] * 2})
    plain = sources.load_source(f"folder:{tmp_path}/plain", "train")
    assert "label" not in sources.dataset_info(f"folder:{tmp_path}/plain").features
    assert "label" not in plain[0]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        sources.check_dataset(f"folder:{tmp_path}/missing")


def test_a_training_config_reads_an_image_folder(tmp_path):
    """`--config.data.name=folder:DIR`: classes from the folders, images of
    any size resized by the pipeline into the model's batches."""
    _write_images(tmp_path, {"train/x": [(40, 30, "RGB")] * 4,
                             "train/y": [(12, 60, "L")] * 4,
                             "test/x": [(28, 28, "RGB")] * 2})  # fmt: skip
    config = load_config(
        "configs/vit_supervised.py:tiny",
        [f"data.name=folder:{tmp_path}", "data.batch_size=8", "data.num_shards=1"],
    )
    task = task_for(config)
    assert task.model_config.num_classes == 2
    batch = next(iter(task.train_iterator()))
    assert batch["images"].shape == (8, 28, 28, 1)
    assert sorted(batch["labels"].tolist()) == [0] * 4 + [1] * 4
    _write_images(tmp_path / "unlabelled", {"train": [(8, 8, "L")]})
    unlabelled = load_config(
        "configs/vit_supervised.py:tiny",
        [f"data.name=folder:{tmp_path}/unlabelled", "data.eval_split=train"],
    )
    with pytest.raises(ConfigError, match="image classification needs labels"):
        task_for(unlabelled)


@pytest.mark.parametrize(
    "config, override, message",
    [
        ("vit_simclr", "data.views.views.count=1", "needs at least 2 views"),
        ("vit_simclr", "objective.temperature=0.0", "temperature=0.0: expected > 0"),
        ("vit_simclr", "model.proj_layers=0", "projection head"),
        ("vit_dino", "model.prototypes=0", "DINO scores views on prototypes"),
        ("vit_dino", "objective.teacher_momentum=1.0", "expected in \\[0, 1\\)"),
        ("vit_dino", "data.views.local_views.size=13", "multiple of patch_size=7"),
        ("vit_dino", "data.views.global_views.augment=('spin',)", "'spin'"),
    ],
)
def test_bad_self_supervised_settings_are_refused_before_training(
    config, override, message
):
    with pytest.raises(ConfigError, match=message):
        task_for(load_config(f"configs/{config}.py:tiny", [override]), with_data=False)
