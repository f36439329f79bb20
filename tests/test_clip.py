"""Image-text dual encoders (configs/clip.py): losses against NumPy, the
per-device losses against the dense ones on 8 devices, the temperature clamp,
zero-shot and retrieval on constructed cases, and tiny runs end to end (resume,
SigLIP on label captions with held-out classes, LiT on a user's CSV pairs,
LoRA on the text tower); LiT and a user's CSV run in
tests/test_readme_image_text.py."""

import json
import math
import os
import re
import shutil

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from fmjax import cli, objectives
from fmjax.eval import retrieval
from fmjax.export import load_export
from fmjax.inference.zeroshot import ImageTextEncoder, resolve_templates
from fmjax.train.state import make_optimizer

# --- losses -------------------------------------------------------------------------


def _embeddings(batch=12, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, dim)).astype(np.float32)
    text = (image + rng.normal(size=(batch, dim))).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    weights = np.ones(batch, np.float32)
    weights[-2:] = 0  # two padding rows
    return unit(image), unit(text), weights


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_infonce_matches_numpy_reference():
    image, text, weights = _embeddings()
    real = weights > 0
    logits = np.exp(2.0) * image[real] @ text[real].T  # padding is no column
    diag = np.arange(real.sum())
    want = -(_log_softmax(logits)[diag, diag] + _log_softmax(logits.T)[diag, diag]) / 2
    got = objectives.infonce_sums(image, text, jnp.float32(2.0), weights)
    np.testing.assert_allclose(got["loss_sum"], want.sum(), rtol=1e-5)
    assert got["count"] == real.sum()
    assert got["correct_i2t"] == (logits.argmax(1) == diag).sum()
    assert got["correct_t2i"] == (logits.argmax(0) == diag).sum()


def test_sigmoid_matches_numpy_reference():
    image, text, weights = _embeddings(seed=1)
    real = weights > 0
    logits = np.exp(2.3) * image[real] @ text[real].T - 10.0
    labels = 2 * np.eye(real.sum()) - 1
    want = np.sum(np.log1p(np.exp(-labels * logits)))  # -log sigmoid(z * logit)
    got = objectives.sigmoid_sums(
        image, text, jnp.float32(2.3), jnp.float32(-10.0), weights
    )
    np.testing.assert_allclose(got["loss_sum"], want, rtol=1e-5)
    assert got["count"] == real.sum()


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_per_device_losses_equal_dense_on_8_devices(loss):
    """InfoNCE of each device's rows against all columns, and SigLIP's ring
    of text chunks (no device holds the B x B logits), equal the one-device
    dense losses: every sum and both embeddings' gradients."""
    assert jax.device_count() == 8
    image, text, weights = _embeddings(batch=16)
    scale, bias = jnp.float32(2.5), jnp.float32(-4.0)
    if loss == "softmax":
        dense = lambda i, t, w: objectives.infonce_sums(i, t, scale, w)  # noqa: E731
        split = lambda i, t, w: objectives.infonce_sums_gathered(i, t, scale, w)  # noqa: E731
    else:
        dense = lambda i, t, w: objectives.sigmoid_sums(i, t, scale, bias, w)  # noqa: E731
        split = lambda i, t, w: objectives.sigmoid_sums_chunked(i, t, scale, bias, w)  # noqa: E731
    grad = lambda f: jax.grad(lambda i, t, w: f(i, t, w)["loss_sum"], (0, 1))  # noqa: E731
    want, want_grads = dense(image, text, weights), grad(dense)(image, text, weights)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        args = [jax.device_put(x, rows) for x in (image, text, weights)]
        got = jax.jit(split)(*args)
        got_grads = jax.jit(grad(split))(*args)
        # The per-device program holds [2, 16] or [2, 2] logits, never [16, 16].
        hlo = jax.jit(split).lower(*args).compile().as_text()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert "f32[16,16]" not in hlo


def test_temperature_is_clamped_and_never_decayed():
    """After an update the log-scale is at most ln(100); AdamW's weight decay
    skips it (a scalar), so with zero gradients it does not move."""
    from fmjax.tasks.image_text import ImageTextTask

    task = ImageTextTask.__new__(ImageTextTask)
    task.config = _clip_config()
    clamped = task.constrain_params({"logit_scale": jnp.float32(5.0), "w": jnp.ones(2)})
    assert float(clamped["logit_scale"]) == pytest.approx(math.log(100), abs=1e-6)
    assert (
        float(task.constrain_params({"logit_scale": jnp.float32(-1.0)})["logit_scale"])
        == 0
    )
    tx, _ = make_optimizer(
        10, learning_rate=0.1, warmup_steps=0, schedule="constant",
        end_learning_rate_ratio=1.0, weight_decay=0.5, b1=0.9, b2=0.98, eps=1e-8,
        grad_clip_norm=0.0,
    )  # fmt: skip
    params = {"logit_scale": jnp.float32(2.0), "kernel": jnp.ones((2, 2))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["logit_scale"]) == 2.0
    assert float(new["kernel"][0, 0]) < 1.0  # matrices do decay


def _clip_config():
    from fmjax.config import load_config

    return load_config("configs/clip.py:tiny")


# --- zero-shot and retrieval ----------------------------------------------------------


class _HandBuilt(ImageTextEncoder):
    """Embeddings written out: image i is the unit vector of its class; a
    class name's text embedding is its class's vector, templates add noise."""

    def __init__(self, classes):
        self.classes = list(classes)
        self.params = {"logit_scale": np.float32(np.log(100.0))}

    def embed_images(self, images, batch_size=64):
        return np.eye(len(self.classes), dtype=np.float32)[np.asarray(images)]

    def embed_texts(self, texts, batch_size=256):
        out = []
        for text in texts:
            (c,) = [
                i
                for i, name in enumerate(self.classes)
                if name in re.findall(r"[a-z]+", text)
            ]
            v = np.eye(len(self.classes))[c] + 0.1 * len(text) / 100
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


def test_zero_shot_picks_the_class_whose_embedding_is_known():
    model = _HandBuilt(["cat", "dog", "fish"])
    picks = model.zero_shot([2, 0, 1], ["cat", "dog", "fish"], templates="clip")
    assert [p["label"] for p in picks] == ["fish", "cat", "dog"]
    assert all(p["score"] > 0.9 for p in picks)
    top2 = model.zero_shot(
        [1], ["cat", "dog", "fish"], templates=["a {} here"], top_k=2
    )
    assert [p["label"] for p in top2[0]] == ["dog", "cat"]
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot([1], ["cat"], templates=["no slot"])
    assert len(resolve_templates("clip")) == 80 and len(resolve_templates(None)) == 7


def test_class_embeddings_average_normalised_templates():
    vectors = {"a x": [3.0, 0.0], "b x": [0.0, 1.0]}
    embed = lambda texts: np.asarray([vectors[t] for t in texts])  # noqa: E731
    got = retrieval.class_embeddings(embed, ["x"], ["a {}", "b {}"])
    np.testing.assert_allclose(got, [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_recall_at_k_on_a_constructed_case():
    images = np.eye(3, dtype=np.float32)
    # Texts 0, 1 describe image 0; text 2 image 1; text 3 image 2 but sits
    # nearest image 1.
    texts = np.asarray([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.6]], np.float32)
    got = retrieval.recall_at_k(images, texts, [0, 0, 1, 2], ks=(1, 2))
    assert got["t2i_r@1"] == 0.75 and got["t2i_r@2"] == 1.0
    # Image 2's best text is text 3 (its own); image 1's is text 2.
    assert got["i2t_r@1"] == 1.0
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval.recall_at_k(images, texts, [0, 1])
    chance = retrieval.chance_recall(3, [2, 1, 1], k=1)
    assert chance["t2i_r@1"] == pytest.approx(1 / 3)
    assert chance["i2t_r@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


# --- end to end ---------------------------------------------------------------------


def _train(workdir, data_dir, steps=4, **extra):
    values = {
        "data.data_dir": data_dir,
        "train.progress": False,
        "train.steps": steps,
        "train.eval_every": steps,
        "checkpoint.every": steps,
        "checkpoint.async_save": False,
        "mesh.num_devices": 1,
        **extra,
    }
    overrides = [f"--config.{k}={v}" for k, v in values.items()]
    argv = ["train", "--config", "configs/clip.py:tiny", "--workdir", str(workdir)]
    assert cli.main(argv + overrides) == 0
    return json.load(open(os.path.join(workdir, "summary.json")))


def _state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)


def test_clip_trains_resumes_and_evaluates(emoji_dir, tmp_path, capsys):
    """A tiny CLIP on emoji pairs: the temperature starts above the clamp and
    is clamped at once; a run resumed at step 2 ends bit-identical; `fmjax
    eval` reports retrieval recall on held-out emoji."""
    settings = {"checkpoint.every": 2, "model.logit_scale_init": 5.0}
    summary = _train(tmp_path / "run", emoji_dir, **settings)
    retrieval_metrics = summary["retrieval"]
    for key in ("i2t_r@1", "t2i_r@5", "chance_t2i_r@10"):
        assert 0 <= retrieval_metrics[key] <= 1
    assert retrieval_metrics["images"] == 32 and retrieval_metrics["texts"] > 32
    # exp(5) = 148 at init; clamped to 100 by the first update, then moving
    # (by at most the learning rate per step) below it.
    assert 95.0 < retrieval_metrics["logit_scale"] <= 100.0 * (1 + 1e-6)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    os.remove(resumed / "summary.json")
    _train(resumed, emoji_dir, **settings)
    final, again = _state(tmp_path / "run", 4), _state(resumed, 4)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(final)[0],
        jax.tree.leaves(again),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    capsys.readouterr()
    argv = ["eval", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["retrieval"]["i2t_r@1"] == retrieval_metrics["i2t_r@1"]
    # The Python face: uint8 pictures and captions in, unit embeddings out,
    # preprocessed as training did (the eval pipeline gives the same vectors).
    import fmjax
    from fmjax.data import sources
    from fmjax.tasks import task_for
    from fmjax.tasks.image_text_eval import _split_images, encoder_for

    m = fmjax.load(str(tmp_path / "run"))
    test = sources.load_source("emoji_captions", "test", str(emoji_dir))
    images = np.stack([test[i]["image"] for i in range(5)])
    embedded = m.embed_images(images)
    assert embedded.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-5)
    config = json.load(open(tmp_path / "run" / "config.json"))
    from fmjax.config import from_json

    task = task_for(from_json(json.dumps(config)))
    encoder = encoder_for(task, m.params, {})
    pipeline, _, captions = _split_images(task, encoder, "test", limit=5)
    np.testing.assert_allclose(embedded, pipeline, atol=1e-5)
    names = [c[0] for c in captions]
    assert [p["label"] for p in m.zero_shot(images, names, templates="name")] == [
        names[i] for i in np.argmax(embedded @ m.embed(names).T, axis=1)
    ]
    index, score = m.retrieve(names[0], images, k=1)[0]
    assert index == int(np.argmax(embedded @ m.embed(names[:1])[0]))


def test_siglip_with_lora_on_the_text_tower_zero_shot_to_held_out_classes(
    fashion_data, tmp_path
):
    """SigLIP on Fashion-MNIST captions made from 7 of the 10 class names,
    LoRA on the text tower's query/value kernels (the text adaptation code)
    with the image tower and projections trained in full: zero-shot over all
    10 classes reports seen and unseen accuracy against chance."""
    summary = _train(
        tmp_path / "run", fashion_data,
        **{
            "data.name": "fashion_mnist", "data.captions": "labels",
            "data.classes": "(0, 1, 2, 3, 4, 5, 6)", "data.eval_split": "test",
            "data.vocab_size": 300, "model.image.image_size": 28,
            "model.image.patch_size": 7, "model.image.channels": 1,
            "data.mean": "(0.286,)", "data.std": "(0.353,)",
            "objective.loss": "sigmoid", "zero_shot.limit": 200,
            "train.evaluators_every": 2,  # zero-shot at step 2 too
            "adapt.method": "lora",
            "adapt.lora_targets": '("text/.*/(query|value)/kernel",)',
            "adapt.train_patterns": '("image/.*", "image_proj/.*", "text_proj/.*", '
            '"logit_scale", "logit_bias")',
        },
    )  # fmt: skip
    zero_shot = summary["zero_shot"]
    assert zero_shot["classes"] == 10 and 0 < zero_shot["images"] <= 200
    assert zero_shot["unseen_only_chance"] == pytest.approx(1 / 3)
    for key in ("top1", "top5", "seen_top1", "unseen_top1", "unseen_only_top1"):
        assert 0 <= zero_shot[key] <= 1
    assert "retrieval" not in summary  # captions made from labels: no retrieval
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    curve = {r["step"]: r for r in records if r["split"] == "zero_shot"}
    assert sorted(curve) == [2, 4] and curve[4]["top1"] == zero_shot["top1"], curve
    report = summary["params"]
    assert report["method"] == "lora" and 0 < report["trainable_percent"] < 100
    state = _state(tmp_path / "run", 4)["params"]
    adapted = sorted(flax.traverse_util.flatten_dict(state["lora"], sep="/"))
    assert adapted and all(p.startswith("text/layers_0/attention/") for p in adapted)
    assert {p.split("/")[3] for p in adapted} == {"query", "value"}, adapted
    assert "image" in state["model"] and "text" not in state["model"]
    assert (
        float(np.asarray(state["model"]["logit_bias"])) != -10.0
    )  # SigLIP's bias trains


def test_image_tower_from_a_pretrained_vit(tiny_vit_dir, emoji_dir, tmp_path, capsys):
    """init.image: the image tower starts from an HF ViT directory (its shape
    and weights; grey 28x28 here, so the emoji are read as grey)."""
    from fmjax.convert.hf import load_hf_model

    settings = {"init.image": tiny_vit_dir, "optimizer.learning_rate": 0.0}
    with pytest.raises(AssertionError):  # CLIP's 3-channel mean: a clear refusal
        _train(tmp_path / "bad", emoji_dir, steps=1, **settings)
    assert "data.mean=(0.48145466" in capsys.readouterr().err
    grey = {"data.mean": "(0.5,)", "data.std": "(0.5,)", "retrieval.limit": 8}
    _train(tmp_path / "run", emoji_dir, steps=1, **settings, **grey)
    params, config = load_export(str(tmp_path / "run"))
    assert config["model"]["image"]["channels"] == 1
    _, vit, _ = load_hf_model(str(tiny_vit_dir))
    np.testing.assert_array_equal(
        params["image"]["patch_embed"]["kernel"], vit["patch_embed"]["kernel"]
    )
