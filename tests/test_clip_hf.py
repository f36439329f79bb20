"""HF CLIP interop: a random HF CLIPModel with CLIP ViT-B/16's widths (vision
768 wide, 12 heads, MLP 3072, 16-pixel patches on 224 images; text 512 wide,
8 heads, MLP 2048; projection 512; 2 layers per tower) against fmjax's
DualEncoder after conversion: image and text embeddings (before and after
normalisation) and logits; export back to HF (an import, and a random fmjax
model with a patch bias and sin-cos positions, through the CLI); CLIP's
tokenizer and image preprocessing against transformers'; refusals."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from ml_collections import ConfigDict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmjax import cli  # noqa: E402
from fmjax.convert import clip, clip_directory, clip_images, hf  # noqa: E402
from fmjax.data.bpe import CLIPBPETokenizer  # noqa: E402
from fmjax.data.captions import encode_captions  # noqa: E402
from fmjax.data.tokenizer import load_tokenizer  # noqa: E402
from fmjax.errors import FormatError  # noqa: E402
from fmjax.export import export, flatten_params, load_export  # noqa: E402
from fmjax.models import build_model  # noqa: E402
from fmjax.models.multimodal import pool_text  # noqa: E402

IMAGE, PATCH = 224, 16
TEXT_LEN = 77
# CLIP's tokenizer is trained on these; CAPTIONS also hold words it never saw
# (byte-level pieces), upper case, accents (NFC), digits, runs of spaces.
TRAIN_TEXT = [
    "a photo of a cat",
    "a photo of a dog on the grass",
    "two cats sleeping on a sofa",
    "A red car parked near the old house",
    "the dog isn't happy, it's 3 PM!",
]
CAPTIONS = [
    "A photo of a CAT",
    "two  dogs\tplaying in the snow",
    "Cafe\u0301 na\u00efve: it's 1984, we'll see!!",
    "a diagram of an x-ray (zoomed)",
]
# CLIPImageProcessor's settings, at the model's size.
PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": IMAGE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE, "width": IMAGE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(clip_images.CLIP_MEAN),
    "image_std": list(clip_images.CLIP_STD),
    "do_convert_rgb": True,
}


def _clip_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    words = (
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
        r"[\p{N}]|[^\s\p{L}\p{N}]+"
    )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def _byte_symbols() -> list[str]:
    """GPT-2's / CLIP's printable stand-ins for the 256 bytes, in vocab order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def build_clip_tokenizer(directory) -> int:
    """Writes a small CLIP tokenizer (transformers' CLIPTokenizer over a BPE
    trained on TRAIN_TEXT, its vocabulary laid out as CLIP's: bytes, bytes +
    `</w>`, merges, then bos and eos last) to `directory`; returns its size."""
    import tokenizers
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(
        models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>")
    )
    bpe.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )
    bpe.pre_tokenizer = _clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TRAIN_TEXT * 5, trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = _byte_symbols()
    vocab = {}
    for token in [
        *symbols,
        *(s + "</w>" for s in symbols),
        *(a + b for a, b in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]:
        vocab.setdefault(token, len(vocab))
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(str(directory))
    return len(vocab)


def _perturb(model, scale: float = 0.1) -> None:
    """Off the trivial init (biases 0, LayerNorm scales 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(scale * torch.randn_like(p))


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def _nchw(pixels_BHWC) -> torch.Tensor:
    return torch.tensor(pixels_BHWC).permute(0, 3, 1, 2).contiguous()


def _features(module, params, pixels, ids, segments):
    """fmjax's unnormalised image and text features and its forward pass."""

    def run(m, pixels, ids, segments):
        image = m.image_proj(m.image(pixels)["pooled"])
        hidden = m.text(ids, segment_ids_BL=segments)["hidden"]
        text = m.text_proj(pool_text(hidden, segments, m.config.text_pool))
        return image, text, m(pixels, ids, segments)

    out = jax.jit(lambda p, *x: module.apply({"params": p}, *x, method=run))(
        params, pixels, ids, segments
    )
    image, text, embeds = jax.tree.map(np.asarray, out)
    logits = (
        np.exp(embeds["logit_scale"]) * embeds["image_embed"] @ (embeds["text_embed"].T)
    )
    return {
        "image_features": image,
        "text_features": text,
        "image_embeds": embeds["image_embed"],
        "text_embeds": embeds["text_embed"],
        "logits_per_image": logits,
    }


def _hf_outputs(model, pixels, ids, segments) -> dict[str, np.ndarray]:
    inputs = dict(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(segments, dtype=torch.long),
    )
    with torch.no_grad():
        out = model(pixel_values=_nchw(pixels), **inputs)
        image = model.get_image_features(pixel_values=_nchw(pixels)).pooler_output
        text = model.get_text_features(**inputs).pooler_output
    return {
        "image_features": image.numpy(),
        "text_features": text.numpy(),
        "image_embeds": out.image_embeds.numpy(),
        "text_embeds": out.text_embeds.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }


def _compare(got, want, what: str) -> float:
    diffs = {k: _max_diff(got[k], want[k]) for k in want}
    print(f"{what}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return max(diffs.values())


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tokenizer")
    return str(path), build_clip_tokenizer(path)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory, tokenizer_dir):
    """(HF directory with tokenizer and preprocessor config, eval CLIPModel)."""
    tokenizer_path, vocab_size = tokenizer_dir
    bos, eos = vocab_size - 2, vocab_size - 1
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=8,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=2,
            num_attention_heads=12,
            image_size=IMAGE,
            patch_size=PATCH,
        ),
        projection_dim=512,
        logit_scale_init_value=4.6,  # a trained CLIP's: exp = 100
    )
    model = transformers.CLIPModel(config).eval()
    _perturb(model)
    path = str(tmp_path_factory.mktemp("hf_clip"))
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_path):
        shutil.copy(os.path.join(tokenizer_path, name), path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f)
    return path, model


@pytest.fixture(scope="module")
def imported(hf_clip):
    """load_hf_clip of the HF directory, and the built module."""
    model_config, params, tokenizer, processor = clip_directory.load_hf_clip(hf_clip[0])
    return model_config, params, tokenizer, processor, build_model(model_config)


@pytest.fixture(scope="module")
def inputs(imported):
    tokenizer = imported[2]
    return (_pixels(3, IMAGE), *encode_captions(tokenizer, CAPTIONS, TEXT_LEN))


# --------------------------------------------------------------------- parity


def test_tokenizer_matches_hf(tokenizer_dir, tmp_path):
    path, vocab_size = tokenizer_dir
    ours = load_tokenizer(path)
    assert isinstance(ours, CLIPBPETokenizer) and ours.vocab_size == vocab_size
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        vocab_size - 2,
        vocab_size - 1,
        vocab_size - 1,
    )
    fast = transformers.CLIPTokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json")
    )
    auto = transformers.AutoTokenizer.from_pretrained(path)
    ours.save(str(tmp_path))  # what an fmjax export writes
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CAPTIONS + TRAIN_TEXT:
        ids = [ours.bos_id, *ours.encode(text), ours.eos_id]
        assert len(ids) > 3
        for other in (fast, auto, again):
            assert other(text).input_ids == ids, (text, type(other).__name__)
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
    assert load_tokenizer(str(tmp_path)).encode(CAPTIONS[2]) == ours.encode(CAPTIONS[2])
    # fmjax's caption batches are HF's padded (and truncated) ones.
    for length in (TEXT_LEN, 6):
        tokens, segments = encode_captions(ours, CAPTIONS, length)
        want = auto(CAPTIONS, padding="max_length", truncation=True, max_length=length)
        np.testing.assert_array_equal(tokens, want.input_ids)
        np.testing.assert_array_equal(segments, want.attention_mask)


def test_embeddings_and_logits_match_hf(hf_clip, imported, inputs):
    path, model = hf_clip
    model_config, params, tokenizer, processor, module = imported
    image, text = model_config["image"], model_config["text"]
    assert (image["d_model"], image["num_heads"], image["mlp_dim"]) == (768, 12, 3072)
    assert (text["d_model"], text["num_heads"], text["mlp_dim"]) == (512, 8, 2048)
    assert (
        image["pre_norm"] and image["activation"] == text["activation"] == "quick_gelu"
    )
    assert model_config["embed_dim"] == 512
    np.testing.assert_array_equal(params["image"]["patch_embed"]["bias"], 0)
    assert processor == clip_images.image_processor_from_hf(PREPROCESSOR)
    got = _features(module, params, *inputs)
    want = _hf_outputs(model, *inputs)
    assert np.ptp(want["logits_per_image"]) > 1.0  # logits that tell texts apart
    assert _compare(got, want, "HF CLIP -> fmjax") <= 1e-4
    # Config files from before transformers' eos fix say eos_token_id 2: HF
    # then pools the largest id, which is CLIP's eos too.
    model.text_model.eos_token_id = 2
    try:
        legacy = _hf_outputs(model, *inputs)["text_features"]
    finally:
        model.text_model.eos_token_id = tokenizer.eos_id
    assert _max_diff(got["text_features"], legacy) <= 1e-4


def test_python_api_on_an_hf_clip_directory(hf_clip):
    """`fmjax.load(HF CLIP dir)`: uint8 images of any size through the
    directory's processor and captions through its tokenizer give HF's
    normalised embeddings; zero_shot and retrieve rank by them."""
    import fmjax
    from fmjax.convert.clip import preprocess_images

    path, model = hf_clip
    m = fmjax.load(path)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        pixels = preprocess_images(list(images), json.load(f))
    ids, segments = encode_captions(m.tokenizer, CAPTIONS, m.text_len)
    want = _hf_outputs(model, pixels, ids, segments)
    assert _max_diff(m.embed_images(images), want["image_embeds"]) <= 1e-4
    assert _max_diff(m.embed(CAPTIONS), want["text_embeds"]) <= 1e-4
    best_text = np.argmax(want["logits_per_image"], axis=1)
    picks = m.zero_shot(images, CAPTIONS, templates="name")
    assert [p["label"] for p in picks] == [CAPTIONS[i] for i in best_text]
    best_image = int(np.argmax(want["logits_per_image"][:, 0]))
    assert m.retrieve(CAPTIONS[0], images, k=1)[0][0] == best_image


def test_import_exports_back_to_hf(hf_clip, imported, inputs, tmp_path):
    path, _ = hf_clip
    model_config, params, tokenizer, processor, module = imported
    config = {"model": model_config, "image_processor": processor}
    back = str(tmp_path / "hf")
    clip_directory.save_hf_clip(back, config, params, tokenizer)
    model, info = transformers.CLIPModel.from_pretrained(back, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    got = _hf_outputs(model.eval(), *inputs)
    want = _features(module, params, *inputs)
    assert _compare(got, want, "fmjax import -> HF") <= 1e-4
    with open(os.path.join(back, "preprocessor_config.json")) as f:
        assert clip_images.image_processor_from_hf(json.load(f)) == processor
    again = clip_directory.load_hf_clip(back)
    flat, flat_again = flatten_params(params), flatten_params(again[1])
    assert sorted(flat) == sorted(flat_again)
    for name, value in flat.items():  # exact: the patch bias was zero
        np.testing.assert_array_equal(value, flat_again[name], err_msg=name)
    assert again[2].encode(CAPTIONS[0]) == tokenizer.encode(CAPTIONS[0])


def test_cli_converts_a_random_fmjax_dual_encoder_both_ways(tokenizer_dir, tmp_path):
    """sin-cos positions and a nonzero patch bias (folded into HF's learned
    positions), through `fmjax convert` both ways."""
    tokenizer = load_tokenizer(tokenizer_dir[0])
    model_config = {
        "kind": "dual_encoder",
        "embed_dim": 48,
        "logit_scale_init": 2.0,
        "image": dict(
            image_size=32, patch_size=8, channels=3, d_model=64, num_layers=2,
            num_heads=4, head_dim=16, mlp_dim=128, position="sincos2d",
            pool="cls", pre_norm=True, activation="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        "text": dict(
            kind="decoder", vocab_size=tokenizer.vocab_size, d_model=32,
            num_layers=2, num_heads=2, head_dim=16, mlp_dim=64, max_len=32,
            activation="quick_gelu", layer_norm_eps=1e-5,
        ),
    }  # fmt: skip
    module = build_model(model_config)
    pixels = _pixels(2, 32, seed=1)
    ids, segments = encode_captions(tokenizer, CAPTIONS, 32)
    # Random values for every param (shapes from eval_shape: no compile).
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels, ids)
    rng = np.random.default_rng(1)
    params = traverse_util.unflatten_dict(
        {
            path: (path[-1] == "scale") + 0.1 * rng.normal(size=x.shape)
            for path, x in traverse_util.flatten_dict(
                nn.unbox(shapes["params"])
            ).items()
        }
    )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    assert np.abs(params["image"]["patch_embed"]["bias"]).min() > 0
    run = str(tmp_path / "run")
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
    export(run, params, ConfigDict({"model": model_config, "data": stats}), tokenizer)
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert cli.main(["convert", "fmjax-to-hf", run, hf_dir]) == 0
    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        written = json.load(f)
    assert written["image_mean"] == [0.5] * 3 and written["crop_size"]["height"] == 32
    model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    want = _features(module, params, pixels, ids, segments)
    got = _hf_outputs(model, pixels, ids, segments)
    assert _compare(got, want, "random fmjax (sincos, patch bias) -> HF") <= 1e-4

    assert cli.main(["convert", "hf-to-fmjax", hf_dir, back]) == 0
    params_back, config_back = load_export(back)
    assert config_back["model"]["image"]["position"] == "learned"
    assert config_back["image_processor"]["image_mean"] == [0.5] * 3
    assert load_tokenizer(os.path.join(back)).encode(CAPTIONS[1]) == tokenizer.encode(
        CAPTIONS[1]
    )
    again = _features(
        build_model(config_back["model"]), params_back, pixels, ids, segments
    )
    assert _compare(again, want, "-> HF -> fmjax") <= 1e-5


# ------------------------------------------------------------------ refusals


def test_refusals(hf_clip, imported, tmp_path):
    model_config, params, tokenizer, processor, _ = imported
    siglip = dict(model_config, logit_bias_init=-10.0)
    with pytest.raises(FormatError, match="logit_bias"):
        clip.hf_config_from_model(siglip, tokenizer)
    with pytest.raises(FormatError, match="model takes 224"):
        clip_images.image_processor_from_hf({"crop_size": 256}, IMAGE)
    copy = tmp_path / "copy"
    shutil.copytree(hf_clip[0], copy)
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(copy / "model.safetensors"))
    weights.pop("text_projection.weight")
    weights["extra.weight"] = np.zeros(3, np.float32)
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(FormatError, match="text_projection.weight.*extra.weight"):
        hf.load_hf_model(str(copy))
    os.remove(copy / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        clip_directory.load_hf_clip(str(copy))
