"""HF ViT / ViTMAE interop: random HF models with ViT-B/16's widths (d=768, 12
heads, MLP 3072; 2 layers; MAE's 512-wide 16-head decoder, 1 layer) on small
images, against fmjax after conversion: hidden states, classifier logits, MAE
predictions and loss under the same noise, `embed_images` with HF's
preprocessing, export back to HF, the CLI, and the refusals."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fmjax  # noqa: E402
from fmjax import cli  # noqa: E402
from fmjax.config import vit_config  # noqa: E402
from fmjax.convert import hf, vit, vit_images  # noqa: E402
from fmjax.errors import FormatError  # noqa: E402
from fmjax.export import export, flatten_params  # noqa: E402
from fmjax.models import build_model  # noqa: E402
from fmjax.models.vision import sincos2d_positions  # noqa: E402
from fmjax.tasks.vision import mae_loss  # noqa: E402

VIT_B = dict(
    hidden_size=768,
    num_hidden_layers=2,
    num_attention_heads=12,
    intermediate_size=3072,
    patch_size=16,
    # Wider than ViT's 0.02 so that every weight moves the outputs well past
    # the 1e-4 tolerance.
    initializer_range=0.05,
)
IMAGE = 32  # 2 x 2 patches for the ViTs
MAE_IMAGE = 64  # 4 x 4 patches: 4 seen, 12 masked
LABELS = ["cat", "dog", "ship", "truck", "plane"]
# Not ViTImageProcessor's defaults, so that embed_images must read them.
PREPROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": IMAGE, "width": IMAGE},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def _perturb(model, scale: float = 0.1) -> None:
    """Off the trivial init (biases and cls 0, LayerNorm scales 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "cls_token", "mask_token")) or "norm" in name:
                p.add_(scale * torch.randn_like(p))


def _save(model, path, preprocessor=None) -> str:
    model.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    if preprocessor is not None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return str(path)


def _pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .normal(size=(batch, size, size, 3))
        .astype(np.float32)
    )


def _nchw(pixels_BHWC) -> torch.Tensor:
    return torch.tensor(pixels_BHWC).permute(0, 3, 1, 2).contiguous()


def _apply_fn(model, **kwargs):
    """A jitted apply of an fmjax.load()ed model's module on NHWC pixels."""
    module = model.module
    return jax.jit(lambda p, x, **kw: module.apply({"params": p}, x, **kw, **kwargs))


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _same_params(a, b) -> None:
    flat_a, flat_b = flatten_params(a), flatten_params(b)
    assert sorted(flat_a) == sorted(flat_b)
    for name, value in flat_a.items():
        np.testing.assert_array_equal(value, flat_b[name], err_msg=name)


def _loading_info(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model.eval(), {k: sorted(v) for k, v in info.items() if v}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """(HF directory, eval-mode ViTModel with its pooler), the directory with a
    preprocessor_config.json."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**VIT_B, image_size=IMAGE)
    model = transformers.ViTModel(config).eval()
    _perturb(model)
    path = _save(model, tmp_path_factory.mktemp("hf_vit"), PREPROCESSOR)
    return path, model


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    """(HF directory, ViTForImageClassification) without query/key/value
    biases (qkv_bias=False) and with named labels."""
    torch.manual_seed(1)
    config = transformers.ViTConfig(
        **VIT_B,
        image_size=IMAGE,
        qkv_bias=False,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = transformers.ViTForImageClassification(config).eval()
    _perturb(model)
    return _save(model, tmp_path_factory.mktemp("hf_classifier")), model


def mae_reference_table(width: int, grid: int) -> np.ndarray:
    """[1 + grid^2, width] positions as the MAE reference computes them
    (facebookresearch/mae util/pos_embed.py, get_2d_sincos_pos_embed with a
    cls row): np.meshgrid(grid_w, grid_h) makes its first half encode the
    column, its second half the row."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_hw = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), axis=0)
    table = np.concatenate(
        [one_d(width // 2, grid_hw[0]), one_d(width // 2, grid_hw[1])], axis=1
    )
    return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


@pytest.fixture(scope="module")
def hf_mae(tmp_path_factory):
    """(HF directory, ViTMAEForPreTraining with norm_pix_loss) whose fixed
    position tables are MAE's, as in a pretrained checkpoint."""
    torch.manual_seed(2)
    config = transformers.ViTMAEConfig(
        **VIT_B,
        image_size=MAE_IMAGE,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
        mask_ratio=0.75,
        norm_pix_loss=True,
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    # transformers 5.x leaves a freshly built model's sin-cos tables at zero
    # (its projection is flagged initialised before the embeddings' init
    # runs); run HF's own table init, as the pretrained checkpoints have them.
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    _perturb(model)
    grid = MAE_IMAGE // VIT_B["patch_size"]
    for table, width in (
        (embeddings.position_embeddings, 768),
        (model.decoder.decoder_pos_embed, 512),
    ):
        want = mae_reference_table(width, grid)
        np.testing.assert_allclose(table.detach().numpy()[0], want, atol=1e-6)
    return _save(model, tmp_path_factory.mktemp("hf_mae")), model


# --------------------------------------------------------------------- parity


def test_sincos_positions_are_the_mae_references():
    for width, grid in ((768, 14), (512, 4), (32, 7)):
        want = mae_reference_table(width, grid)[1:]
        np.testing.assert_allclose(sincos2d_positions(grid, width), want, atol=1e-6)


def test_vit_hidden_states_match_hf(hf_vit):
    path, model = hf_vit
    fm = fmjax.load(path)
    cfg = fm.module.config
    assert (cfg.kind, cfg.position, cfg.pool, cfg.num_classes) == (
        "vit",
        "learned",
        "cls",
        0,
    )
    assert cfg.layer_norm_eps == 1e-12 and cfg.activation == "gelu"
    pixels = _pixels(4, IMAGE)
    with torch.no_grad():
        want = model(pixel_values=_nchw(pixels)).last_hidden_state.numpy()
    out = _apply_fn(fm)(fm.params, pixels)
    diff = _max_diff(out["hidden"], want)
    print(f"ViT: max |hidden fmjax - HF| {diff:.2e} (hidden std {want.std():.2f})")
    assert diff <= 1e-4
    # fmjax's pooled feature is HF's final-LayerNorm cls state.
    assert _max_diff(out["pooled"], want[:, 0]) <= 1e-4


def test_vit_classifier_logits_match_hf(hf_classifier):
    path, model = hf_classifier
    fm = fmjax.load(path)
    assert fm.module.config.num_classes == len(LABELS)
    assert fm.label_names == LABELS
    np.testing.assert_array_equal(fm.params["layers_0"]["attention"]["key"]["bias"], 0)
    pixels = _pixels(4, IMAGE, seed=1)
    with torch.no_grad():
        want = model(pixel_values=_nchw(pixels)).logits.numpy()
    got = _apply_fn(fm)(fm.params, pixels)["logits"]
    diff = _max_diff(got, want)
    print(f"ViT classifier: max |logits fmjax - HF| {diff:.2e} (std {want.std():.2f})")
    assert diff <= 1e-4


def test_vit_export_reloads_in_hf_and_round_trips(hf_vit, hf_classifier, tmp_path):
    pixels = _pixels(3, IMAGE, seed=2)
    for (path, _), cls, output in (
        (hf_vit, transformers.AutoModel, "last_hidden_state"),
        (hf_classifier, transformers.AutoModelForImageClassification, "logits"),
    ):
        fm = fmjax.load(path)
        back = str(tmp_path / os.path.basename(path))
        hf.save_hf_vit(back, fm.config, fm.params)
        model, info = _loading_info(cls, back)
        if output == "logits":
            assert info == {} and model.config.id2label == dict(enumerate(LABELS))
        else:  # no pooler: transformers initialises it and says so
            assert info == {
                "missing_keys": ["pooler.dense.bias", "pooler.dense.weight"]
            }
        with torch.no_grad():
            got_hf = getattr(model(pixel_values=_nchw(pixels)), output).numpy()
        out = _apply_fn(fm)(fm.params, pixels)
        want = out["hidden"] if output == "last_hidden_state" else out["logits"]
        diff = _max_diff(got_hf, want)
        print(f"{cls.__name__} of the export: max |{output} HF - fmjax| {diff:.2e}")
        assert diff <= 1e-4
        _same_params(fmjax.load(back).params, fm.params)


def test_mae_predictions_and_loss_match_hf(hf_mae, tmp_path):
    path, model = hf_mae
    exported = str(tmp_path / "mae_fmjax")
    assert cli.main(["convert", "hf-to-fmjax", path, exported]) == 0
    fm = fmjax.load(exported)
    cfg = fm.module.config
    assert (cfg.kind, cfg.decoder_d_model, cfg.decoder_heads, cfg.decoder_layers) == (
        "vit_mae",
        512,
        16,
        1,
    )
    objective = fm.config.objective
    assert (objective.mask_ratio, objective.norm_pix_loss) == (0.75, True)
    pixels = _pixels(3, MAE_IMAGE, seed=3)
    noise = np.random.default_rng(4).random((3, cfg.num_patches)).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=_nchw(pixels), noise=torch.tensor(noise))
        latent = model.vit(pixel_values=_nchw(pixels), noise=torch.tensor(noise))
    apply = _apply_fn(fm, mask_ratio=0.75)
    out = apply(fm.params, pixels, noise_BP=noise)
    np.testing.assert_array_equal(out["mask"], want.mask.numpy())
    hidden_diff = _max_diff(out["hidden"], latent.last_hidden_state.numpy())
    pred_diff = _max_diff(out["pred"], want.logits.numpy())

    def loss(ddof):
        ones = np.ones(3, np.float32)
        sums = mae_loss(out["pred"], pixels, out["mask"], ones, 16, True, ddof=ddof)
        return float(sums["loss_sum"] / sums["count"])

    loss_diff = abs(loss(1) - float(want.loss))
    print(
        f"MAE: max |hidden| diff {hidden_diff:.2e}, |pred - HF logits| "
        f"{pred_diff:.2e}, |loss - HF loss| {loss_diff:.2e} (HF loss "
        f"{float(want.loss):.4f}; fmjax's training normalisation, ddof=0, is "
        f"{abs(loss(0) - float(want.loss)):.2e} off)"
    )
    assert max(hidden_diff, pred_diff, loss_diff) <= 1e-4

    # Export back through the CLI: HF reads every tensor and computes the same.
    back = str(tmp_path / "mae_hf")
    assert cli.main(["convert", "fmjax-to-hf", exported, back]) == 0
    again, info = _loading_info(transformers.ViTMAEForPreTraining, back)
    assert info == {}
    with torch.no_grad():
        redo = again(pixel_values=_nchw(pixels), noise=torch.tensor(noise))
    assert _max_diff(redo.logits.numpy(), out["pred"]) <= 1e-4
    assert abs(float(redo.loss) - loss(1)) <= 1e-4
    _same_params(fmjax.load(back).params, fm.params)


def test_embed_images_preprocess_as_hf(hf_vit):
    from PIL import Image

    path, model = hf_vit
    images = np.random.default_rng(5).integers(0, 256, (3, 40, 50, 3), np.uint8)
    mean, std = (np.asarray(PREPROCESSOR[k]) for k in ("image_mean", "image_std"))
    resized = [
        np.asarray(Image.fromarray(x).resize((IMAGE, IMAGE), Image.BILINEAR))
        for x in images
    ]
    pixels = ((np.stack(resized) / 255.0 - mean) / std).astype(np.float32)
    with torch.no_grad():
        want = model(pixel_values=_nchw(pixels)).last_hidden_state[:, 0].numpy()
    got = fmjax.load(path).embed_images(images)
    diff = _max_diff(got, want)
    print(f"embed_images on 40x50 images: max |fmjax - HF cls state| {diff:.2e}")
    assert got.shape == (3, 768) and diff <= 1e-4


def test_missing_preprocessor_config_means_vit_defaults(hf_classifier):
    path, _ = hf_classifier
    assert not os.path.exists(os.path.join(path, "preprocessor_config.json"))
    fields = hf.import_fields(path, hf.load_hf_model(path)[0])
    processor = fields["image_processor"]
    assert processor["image_mean"] == processor["image_std"] == [0.5] * 3
    assert processor["size"] == [IMAGE, IMAGE] and processor["resample"] == 2


# ------------------------------------------------------------------------ CLI


def test_cli_converts_a_tiny_fmjax_vit_both_ways(tmp_path):
    """A sin-cos ViT as fmjax trains it (grey 28x28, 7x7 patches) -> HF
    ViTModel (its table as HF's learned one) -> fmjax."""
    config = vit_config("tiny")
    config.model.update(d_model=64, num_heads=4)
    module = build_model(config.model)
    images = _pixels(2, 28, seed=6)[..., :1]
    params = nn.unbox(module.init(jax.random.PRNGKey(0), images)["params"])
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    params = jax.tree.map(
        lambda x: np.asarray(x + 0.1 * jax.random.normal(next(keys), x.shape)), params
    )
    export(str(tmp_path / "run"), params, config, None)
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert cli.main(["convert", "fmjax-to-hf", str(tmp_path / "run"), hf_dir]) == 0
    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        assert json.load(f)["image_mean"] == [0.286]
    model = transformers.AutoModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        got = model(pixel_values=_nchw(images)).last_hidden_state.numpy()
    want = module.apply({"params": params}, images)["hidden"]
    assert _max_diff(got, want) <= 1e-4
    assert cli.main(["convert", "hf-to-fmjax", hf_dir, back]) == 0
    fm = fmjax.load(back)
    assert fm.module.config.position == "learned"
    again = fm.module.apply({"params": fm.params}, images)["hidden"]
    assert _max_diff(again, want) <= 1e-5
    # Every param comes back bit-exact; the sin-cos table as a learned one.
    _same_params(fm.params, {**params, "position_embed": sincos2d_positions(4, 64)})


# ------------------------------------------------------------------ refusals


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    torch.save(
        {"embeddings.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "pytorch_model.bin"
    )
    for load in (hf.load_hf_model, fmjax.load):
        with pytest.raises(FormatError, match="pickle"):
            load(str(tmp_path))
    assert cli.main(["convert", "hf-to-fmjax", str(tmp_path), str(tmp_path / "o")]) == 2


def test_mae_tables_other_than_sincos_are_refused(hf_mae, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = hf_mae
    copy = tmp_path / "rows_first"
    shutil.copytree(path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    table = weights["decoder.decoder_pos_embed"]
    half = table.shape[-1] // 2  # rows in the first half: the layout MAE avoids
    weights["decoder.decoder_pos_embed"] = np.concatenate(
        [table[..., half:], table[..., :half]], axis=-1
    )
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(FormatError, match="decoder.decoder_pos_embed is not MAE's"):
        hf.load_hf_model(str(copy))


def test_hf_configs_keep_their_patch_embedding_init():
    """HF's ViT starts its patch embedding at normal(initializer_range),
    ViTMAE (as MAE) at Xavier: a converted config trained further from
    scratch starts as HF's would."""
    assert vit.model_config_from_hf({"model_type": "vit"})["patch_init"] == "normal"
    mae = vit.model_config_from_hf({"model_type": "vit_mae"})
    assert mae["patch_init"] == "xavier"


def test_unsupported_vit_configs_are_refused():
    with pytest.raises(FormatError, match="square"):
        vit.model_config_from_hf({"model_type": "vit", "image_size": [224, 160]})
    model = dict(vit_config("tiny").model, pool="mean")
    with pytest.raises(FormatError, match="pool='mean'"):
        vit.hf_config_from_model(model)
    with pytest.raises(FormatError, match="do_center_crop"):
        vit_images.image_processor_from_hf({"do_center_crop": True}, 224)
    with pytest.raises(FormatError, match="shortest_edge"):
        vit_images.image_processor_from_hf({"size": {"shortest_edge": 224}}, 224)
