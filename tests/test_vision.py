"""Vision: the ViT (patches, positions, readouts, the shared Block), the
Fashion-MNIST builder, image pipelines and augmentations, and a supervised
ViT run end to end."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

import fmjax
from fmjax import cli
from fmjax.data import fashion_mnist, sources
from fmjax.data import images as image_data
from fmjax.models import build_model, model_config, param_axes
from fmjax.models.registry import abstract_model_params
from fmjax.models.text import count_params
from fmjax.models.vision import patchify, sincos2d_positions, unpatchify

VIT = dict(kind="vit", image_size=28, patch_size=7, channels=1, d_model=32,
           num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)  # fmt: skip


def test_patchify_round_trip_and_patch_order():
    images = np.random.default_rng(0).random((2, 28, 28, 3)).astype(np.float32)
    patches = patchify(images, 7)
    assert patches.shape == (2, 16, 7 * 7 * 3)
    # Patch 5 is row 1, column 1 of the 4 x 4 grid, flattened (row, col, channel).
    np.testing.assert_array_equal(patches[1, 5], images[1, 7:14, 7:14].reshape(-1))
    np.testing.assert_array_equal(unpatchify(patches, 7, 3), images)


def test_sincos_positions_encode_row_and_column():
    table = sincos2d_positions(4, 32)
    assert table.shape == (16, 32) and np.abs(table).max() <= 1.0
    grid = table.reshape(4, 4, 32)
    # The first half depends on the column only, the second on the row only.
    np.testing.assert_allclose(grid[0, :, :16], grid[3, :, :16])
    np.testing.assert_allclose(grid[:, 0, 16:], grid[:, 2, 16:])
    assert len({row.tobytes() for row in table}) == 16


def test_vit_b16_has_the_reference_parameter_count():
    """ViT-B/16 with a 1000-class head: 86,567,656 params with learned
    positions (197 x 768, cls included) in the reference; fmjax's learned table
    has no cls row (196), and 2-D sin-cos positions are not params."""
    b16 = dict(kind="vit", image_size=224, patch_size=16, channels=3, d_model=768,
               num_layers=12, num_heads=12, head_dim=64, mlp_dim=3072,
               num_classes=1000)  # fmt: skip
    sincos = count_params(abstract_model_params(b16))
    learned = count_params(abstract_model_params({**b16, "position": "learned"}))
    assert sincos == 86_567_656 - 197 * 768
    assert learned == 86_567_656 - 768


def test_vit_reuses_the_text_block_and_its_logical_axes():
    vit_axes = param_axes(model_config(VIT))
    text = {k.split(".", 1)[1]: v for k, v in TINY.items() if k.startswith("model")}
    text_axes = param_axes(
        model_config({"kind": "decoder", "num_layers": 2, "num_heads": 2, **text})
    )
    layer = {k: v for k, v in vit_axes.items() if k.startswith("layers_0/")}
    assert layer == {k: v for k, v in text_axes.items() if k.startswith("layers_0/")}
    assert vit_axes["patch_embed/kernel"] == ("patch", "embed")


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_readouts_and_kept_patches(pool):
    cfg = model_config({**VIT, "pool": pool, "num_classes": 10})
    module = build_model(cfg)
    images = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(1), images)["params"])
    apply = jax.jit(
        lambda p, x, keep=None: module.apply({"params": p}, x, keep_BK=keep)
    )
    out = apply(params, images)
    tokens = 16 + (pool == "cls")
    assert out["hidden"].shape == (3, tokens, 32) and out["logits"].shape == (3, 10)
    # Keeping every patch in order changes nothing; keeping 4 runs 4 tokens.
    keep_all = np.broadcast_to(np.arange(16), (3, 16))
    np.testing.assert_allclose(
        apply(params, images, keep_all)["logits"],
        out["logits"],
        atol=1e-5,
    )
    keep = np.stack([np.random.default_rng(i).permutation(16)[:4] for i in range(3)])
    kept = apply(params, images, keep)["hidden"]
    assert kept.shape == (3, 4 + (pool == "cls"), 32)
    # A patch outside the kept set does not matter.
    other = np.asarray(images).copy()
    dropped = [p for p in range(16) if p not in keep[0]][0]
    r, c = divmod(dropped, 4)
    other[0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] += 5.0
    again = apply(params, other, keep)["hidden"]
    np.testing.assert_allclose(again, kept, atol=1e-5)


def test_vit_refuses_images_it_cannot_cut_into_patches():
    module = build_model(VIT)
    for shape in ((1, 32, 32, 1), (1, 28, 21, 1), (1, 28, 28, 3)):
        with pytest.raises(ValueError, match=r"expected \[B, S, S, 1\]"):
            module.init(jax.random.key(0), np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="patch_size=5"):
        model_config({**VIT, "patch_size": 5})


def test_patch_embedding_starts_at_xavier_scale_unless_normal_is_asked():
    """ "xavier" (the default, MAE's scale): kernel std sqrt(2 / (16 +
    128)) = 0.118 for 4x4 grey patches, so tokens differ from image to image
    as much as the sin-cos positions differ from patch to patch, and a fresh
    ViT's pooled features already tell images apart; "normal" (HF ViT and
    CLIP): init_std = 0.02 like every other kernel, a token a tenth image."""
    small = {**VIT, "patch_size": 4, "d_model": 128, "head_dim": 64}
    images = jax.random.normal(jax.random.key(0), (64, 28, 28, 1))
    spread = {}
    for patch_init, std in (("xavier", (2 / (16 + 128)) ** 0.5), ("normal", 0.02)):
        module = build_model({**small, "patch_init": patch_init})
        params = nn.unbox(module.init(jax.random.key(1), images[:1])["params"])
        kernel = np.asarray(params["patch_embed"]["kernel"])
        assert kernel.shape == (16, 128)
        np.testing.assert_allclose(kernel.std(), std, rtol=0.1)
        pooled = np.asarray(module.apply({"params": params}, images)["pooled"])
        unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        spread[patch_init] = 1 - (unit @ unit.T).mean()  # 0: one vector for all
    assert spread["xavier"] > 3 * spread["normal"], spread
    with pytest.raises(ValueError, match=r"patch_init='lecun': expected one of"):
        model_config({**VIT, "patch_init": "lecun"})


# --- data -------------------------------------------------------------------------


def test_fashion_mnist_builder_has_the_catalog_features(fashion_dir, fashion_data):
    info = sources.dataset_info("fashion_mnist", str(fashion_data))
    assert info.features["image"].shape == (28, 28, 1)
    assert info.features["label"].names[0] == "T-shirt/top"
    assert info.features["label"].num_classes == 10
    source = sources.load_source("fashion_mnist", "test", str(fashion_data))
    assert len(source) == 96
    raw = fashion_mnist.read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    labels = fashion_mnist.read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz")
    by_pixels = {
        image.tobytes(): label for image, label in zip(raw, labels, strict=True)
    }
    for i in range(len(source)):  # TFDS shuffles: match examples by their pixels
        example = source[i]
        assert example["image"].dtype == np.uint8
        assert by_pixels[example["image"][..., 0].tobytes()] == example["label"]


def test_fashion_mnist_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        sources.prepare("fashion_mnist", str(tmp_path / "data"))


def test_augmentations_are_seeded_and_keep_shapes():
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), np.uint8)
    ops = ("random_resized_crop(scale=0.3)", "flip", "jitter", "blur(p=1.0)",
           "solarize(p=1.0)", "gray_to_rgb")  # fmt: skip
    augment = image_data.Augment(ops, 24, 1, (0.0,), (1.0,))
    a = augment.view(image, np.random.default_rng(5))
    b = augment.view(image, np.random.default_rng(5))
    c = augment.view(image, np.random.default_rng(6))
    assert a.shape == (24, 24, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    flipped = image_data.flip(image / 255.0, np.random.default_rng(0), size=28, p=1.0)
    np.testing.assert_array_equal(flipped, (image / 255.0)[:, ::-1])
    for bad in ("rotate", "flip(p=)", "flip(0.5)"):
        with pytest.raises((ValueError, SyntaxError)):
            image_data.parse_op(bad)


def test_image_pipeline_resumes_exactly(fashion_data):
    source = sources.load_source("fashion_mnist", "train", str(fashion_data))
    settings = dict(image_size=28, channels=1, batch_size=8, seed=3,
                    augment=("random_resized_crop", "flip"))  # fmt: skip
    it = image_data.make_image_iterator(source, **settings)
    next(it), next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    again = image_data.make_image_iterator(source, **settings)
    again.set_state(state)
    for batch in want:
        got = next(again)
        for key in image_data.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], batch[key])
    assert want[0]["images"].shape == (8, 28, 28, 1)


# --- end to end ---------------------------------------------------------------------


def _train_tiny(config: str, workdir: str, data_dir, steps: int, **extra):
    """`fmjax train` of configs/CONFIG.py:tiny on the Fashion-MNIST slice, eval
    at step 0 and the end, plus `extra` overrides; (summary.json,
    metrics.jsonl records)."""
    values = {
        "data.data_dir": data_dir,
        "train.progress": False,
        "train.steps": steps,
        "train.eval_every": steps,
        "features.train_examples": 240,
        "features.shots": "(1, 10)",
        "features.seeds": "(0, 1)",
        "optimizer.learning_rate": 3e-3,
        "mesh.num_devices": 1,
        **extra,
    }
    overrides = [f"--config.{k}={v}" for k, v in values.items()]
    argv = ["train", "--config", f"configs/{config}.py:tiny", "--workdir", workdir]
    assert cli.main(argv + overrides) == 0
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    records = [
        json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
    ]
    return summary, records


def test_supervised_vit_trains_evaluates_and_exports(fashion_data, tmp_path, capsys):
    workdir = str(tmp_path / "vit")
    # The config's learning rate (the other tiny runs take 3e-3) and all 96
    # held-out images: on 32, accuracy after a few steps was 6 to 11 right
    # from one init to another.
    settings = {"train.eval_batches": 6, "optimizer.learning_rate": 1e-3}
    settings["train.evaluators_every"] = 30  # frozen features at 30 and at the end
    summary, records = _train_tiny(
        "vit_supervised", workdir, fashion_data, steps=60, **settings
    )
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    # 60 steps of 16 images: far from trained, but above chance (0.1) on 96
    # held-out images (20 or more right by chance: p = 0.001).
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.1, evals
    assert summary["eval"]["accuracy"] >= 20 / 96, summary["eval"]
    assert all("images_per_s" in r for r in records if r["split"] == "train")
    features = summary["features"]  # the encoder's frozen features, evaluated
    for key in ("knn_accuracy", "linear_probe_accuracy", "fewshot_10_accuracy"):
        assert 0.2 < features[key] <= 1.0, features
    curve = {r["step"]: r for r in records if r["split"] == "features"}
    assert sorted(curve) == [30, 60], sorted(curve)  # the last one written once
    assert {k: curve[60][k] for k in features} == features
    assert {k: curve[30][k] for k in features} != features  # the encoder moved
    assert os.path.exists(os.path.join(workdir, "export", "model.safetensors"))
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", workdir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isclose(result["accuracy"], summary["eval"]["accuracy"])


# --- MAE --------------------------------------------------------------------------

MAE = {**VIT, "kind": "vit_mae", "decoder_d_model": 16, "decoder_layers": 1,
       "decoder_heads": 2, "decoder_head_dim": 8, "decoder_mlp_dim": 32}  # fmt: skip


def test_random_masking_keeps_exactly_the_ratio_per_example():
    from fmjax.models.mae import random_masking

    noise = jax.random.uniform(jax.random.key(0), (5, 16))
    keep_BK, restore_BP, mask_BP, masked_BM = random_masking(noise, 4)
    assert keep_BK.shape == (5, 4) and masked_BM.shape == (5, 12)
    np.testing.assert_array_equal(np.asarray(mask_BP).sum(axis=1), 12)
    for b in range(5):
        kept = set(np.asarray(keep_BK[b]).tolist())
        assert kept == set(np.argsort(np.asarray(noise[b]))[:4].tolist())
        assert kept == {p for p in range(16) if mask_BP[b, p] == 0}
        masked = set(np.asarray(masked_BM[b]).tolist())
        assert masked == {p for p in range(16) if mask_BP[b, p] == 1}
        shuffle = np.argsort(np.asarray(noise[b]))
        np.testing.assert_array_equal(shuffle[np.asarray(restore_BP[b])], np.arange(16))


@pytest.fixture(scope="module")
def mae():
    module = build_model(MAE)
    images = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    params = nn.unbox(
        jax.jit(module.init)(jax.random.key(2), images, noise_BP=noise)["params"]
    )
    params = jax.tree.map(  # off the init: biases and the mask token matter
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params
    )
    apply = jax.jit(lambda i, n: module.apply({"params": params}, i, noise_BP=n))
    return apply, np.asarray(images), np.asarray(noise)


def test_mae_encoder_sees_only_visible_patches_and_order_is_restored(mae):
    apply, images, noise = mae
    out = apply(images, noise)
    assert out["pred"].shape == (2, 16, 49) and out["hidden"].shape == (2, 5, 32)
    mask = np.asarray(out["mask"])
    # A masked patch's pixels change nothing.
    hidden = int(np.flatnonzero(mask[0])[0])
    other = images.copy()
    r, c = divmod(hidden, 4)
    other[0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] += 3.0
    np.testing.assert_allclose(apply(other, noise)["pred"], out["pred"], atol=1e-5)
    # Reordering the kept patches (same kept set) gives the same prediction:
    # the decoder puts every token back at its patch.
    reordered = noise.copy()
    kept = np.flatnonzero(mask[0] == 0)
    reordered[0, kept] = noise[0, kept][::-1]
    again = apply(images, reordered)
    np.testing.assert_array_equal(np.asarray(again["mask"]), mask)
    np.testing.assert_allclose(again["pred"], out["pred"], atol=1e-5)


@pytest.mark.parametrize("decoder_layers", [1, 2])
def test_mae_masked_only_gives_the_full_predictions_loss_and_gradients(decoder_layers):
    """Training's path (the decoder's last layer and the loss at the masked
    patches only) against every patch predicted and the loss masked."""
    from fmjax.tasks.vision import mae_loss

    module = build_model({**MAE, "decoder_layers": decoder_layers})
    images = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    noise = jax.random.uniform(jax.random.key(1), (3, 16))
    params = nn.unbox(module.init(jax.random.key(2), images, noise_BP=noise)["params"])
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params
    )
    weights = jnp.asarray([1.0, 0.0, 1.0])

    def loss(params, masked_only):
        out = module.apply(
            {"params": params}, images, noise_BP=noise, masked_only=masked_only
        )
        at = out.get("pred_at")
        sums = mae_loss(
            out["pred"], images, out["mask"], weights, 7, True, pred_at_BM=at
        )
        return sums["loss_sum"] / sums["count"], out

    (full, out), full_grads = jax.value_and_grad(loss, has_aux=True)(params, False)
    (part, out_m), part_grads = jax.value_and_grad(loss, has_aux=True)(params, True)
    assert out_m["pred"].shape == (3, 12, 49)
    np.testing.assert_allclose(
        out_m["pred"],
        jnp.take_along_axis(out["pred"], out_m["pred_at"][..., None], axis=1),
        atol=1e-5,
    )
    np.testing.assert_allclose(part, full, rtol=1e-6)
    leaves = zip(jax.tree.leaves(part_grads), jax.tree.leaves(full_grads), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mae_loss_counts_masked_patches_with_normalised_targets():
    from fmjax.tasks.vision import mae_loss

    rng = np.random.default_rng(0)
    images = rng.random((2, 28, 28, 1)).astype(np.float32)
    pred = rng.random((2, 16, 49)).astype(np.float32)
    mask = (rng.random((2, 16)) < 0.75).astype(np.float32)
    weights = np.asarray([1.0, 0.0], np.float32)  # the second row is padding
    sums = mae_loss(pred, images, mask, weights, 7, norm_pix=True)
    target = np.asarray(patchify(images, 7), np.float64)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, keepdims=True) + 1e-6
    )
    error = ((pred - target) ** 2).mean(-1)
    np.testing.assert_allclose(sums["loss_sum"], (error[0] * mask[0]).sum(), rtol=1e-5)
    assert float(sums["count"]) == mask[0].sum()


def _run_files(workdir):
    """Bytes of every file of the latest checkpoint and of the export."""
    files = {}
    for root, _, names in os.walk(workdir):
        if "checkpoints" in root or root.endswith("export"):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return files


def test_mae_trains_resumes_and_its_eval_loss_is_deterministic(
    fashion_data, tmp_path, capsys
):
    from test_ssl import _assert_same_state, _train_then_resume

    summary, final, again = _train_then_resume("vit_mae", fashion_data, tmp_path, 20)
    _assert_same_state(final, again)  # resumed at step 10: the same end
    workdir = str(tmp_path / "run")
    records = [
        json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
    ]
    evals = [r for r in records if r["split"] == "eval"]
    # Normalised-pixel targets: predicting 0 (each patch's mean) costs at most
    # 1 a patch (less for blank background patches); an untrained decoder is
    # near that, and 20 steps bring it down.
    assert evals[0]["loss"] < 1.5, evals[0]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05, evals
    capsys.readouterr()
    params_before_eval = _run_files(workdir)
    assert cli.main(["eval", "--workdir", workdir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == summary["eval"]["loss"]
    # fmjax eval reports the same frozen-feature evaluation as training did.
    assert result["features"] == summary["features"]
    # Evaluating (k-NN, ridge, the linear probe) left the encoder as trained.
    assert _run_files(workdir) == params_before_eval
    # The encoder's features from raw uint8 images, through fmjax.load.
    source = sources.load_source("fashion_mnist", "test", str(fashion_data))
    raw = np.stack([source[i]["image"] for i in range(5)])
    model = fmjax.load(workdir)
    features = model.embed_images(raw)
    assert features.shape == (5, 32) and np.isfinite(features).all()
    np.testing.assert_allclose(model.embed_images(raw[:, :, :, 0])[2], features[2])
    assert not np.allclose(features[0], features[1])


# --- benchmark shapes ---------------------------------------------------------------


@pytest.mark.parametrize("config", ["vit_mae", "vit_supervised"])
def test_bench_against_hf_trains_the_same_shapes(config):
    """`fmjax bench train --against hf` builds HF's model of the config: the
    same number of trained parameters (HF's fixed sin-cos tables, which do not
    train, aside)."""
    from fmjax.bench_vision import _hf_model
    from fmjax.config import load_config

    cfg = load_config(f"configs/{config}.py:tiny", [])
    hf = _hf_model(cfg)
    trained = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    if config == "vit_supervised":
        trained -= hf.vit.embeddings.position_embeddings.numel()  # fmjax: sin-cos
    module = build_model(model_config(cfg.model.to_dict()))
    images = np.zeros((1, 28, 28, 1), np.float32)
    kwargs = {"noise_BP": np.zeros((1, 16), np.float32)} if config == "vit_mae" else {}
    params = module.init(jax.random.key(0), images, **kwargs)["params"]
    assert count_params(nn.unbox(params)) == trained
