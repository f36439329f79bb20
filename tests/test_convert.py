"""HF BERT interop: WordPiece ids, parity with transformers on real all-MiniLM-L6-v2
weights, export back to HF, and the refusals (pickles, non-BERT configs)."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fmjax  # noqa: E402
from fmjax.convert import hf  # noqa: E402
from fmjax.data.tokenizer import load_tokenizer  # noqa: E402
from fmjax.data.wordpiece import WordPieceTokenizer  # noqa: E402
from fmjax.export import load_export  # noqa: E402

SENTENCES = [
    "Hello, world!",
    "Café naïve Zürich: Ångström's résumé.",
    "It costs $1,234.56 (about 12%) since 1999-01-02.",
    "☃ snowman and 🤖 robot",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "A longer sentence that goes on, with commas; numbers like 42 and more words "
    "so that its row sets the padded width of the batch.",
]
# Tokenizer-only extras: unknown scripts, a word past max_input_chars_per_word,
# whitespace control characters, the empty string.
TOKENIZER_TEXTS = SENTENCES + [
    "中文字符 and 日本語のテキスト",
    "x" * 150 + " tail",
    "tabs\tand\nnewlines  \r\n",
    "",
    "don't stop-believing; e-mail: a.b@c.com #hashtag",
]


@pytest.fixture(scope="module")
def torch_model(minilm_dir):
    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def fm(minilm_dir):
    return fmjax.load(minilm_dir)


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def _mean_pool(hidden_BLD, mask_BL):
    mask_BL1 = mask_BL[..., None].astype(np.float64)
    return (hidden_BLD * mask_BL1).sum(1) / mask_BL1.sum(1)


@pytest.fixture(scope="module")
def batch(fm, torch_model):
    """fmjax's padded ids of SENTENCES and the torch model's last hidden states."""
    ids = fm.encode_batch(SENTENCES)
    mask = ids != fm.tokenizer.pad_id
    assert (~mask).any(), "the batch must contain padding"
    return ids, mask, _torch_hidden(torch_model, ids, mask)


# ------------------------------------------------------------------ tokenizer


def test_wordpiece_ids_equal_hf_tokenizer(minilm_dir, tmp_path):
    reference = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir, name), vocab_only)
    for source in (minilm_dir, str(vocab_only)):
        tok = WordPieceTokenizer.load(source)
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (
            reference.pad_token_id,
            reference.cls_token_id,
            reference.sep_token_id,
            reference.mask_token_id,
            reference.unk_token_id,
        )
        assert tok.vocab_size == len(reference)
        for text in TOKENIZER_TEXTS:
            want = reference(text)["input_ids"]
            assert tok.encode(text) == want[1:-1], text
            wrapped = [tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]
            assert tok.decode(wrapped) == reference.decode(
                want, skip_special_tokens=True
            )
    assert tok.encode("x" * 150) == [tok.unk_id]
    assert tok.unk_id in tok.encode("☃")


def test_wordpiece_cased_vocab_and_save_reload(minilm_dir, tmp_path):
    source = tmp_path / "cased_source"
    source.mkdir()
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), source)
    settings = {"do_lower_case": False, "tokenizer_class": "BertTokenizer"}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    cased = WordPieceTokenizer.load(source)
    reference = transformers.AutoTokenizer.from_pretrained(str(source))
    lowered = WordPieceTokenizer.load(minilm_dir)
    assert cased.encode("Hello Zürich") != lowered.encode("Hello Zürich")
    for text in TOKENIZER_TEXTS:
        assert cased.encode(text) == reference(text)["input_ids"][1:-1], text
    for tok, name in ((cased, "cased"), (lowered, "lowered")):
        tok.save(tmp_path / name)
        reloaded = load_tokenizer(tmp_path / name)
        again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        for text in TOKENIZER_TEXTS:
            ids = tok.encode(text)
            assert reloaded.encode(text) == ids == again(text)["input_ids"][1:-1]


# --------------------------------------------------------- parity (real weights)


def test_encode_batch_wraps_once_like_hf(fm, minilm_dir, batch):
    ids, _, _ = batch
    reference = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    want = reference(SENTENCES, padding=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, want)


def test_hidden_states_and_mean_pooling_match_torch(fm, batch):
    ids, mask, want = batch
    got = fm.hidden(ids)
    diff = np.abs(got - want)[mask].max()
    print(f"max |hidden fmjax - torch| on real tokens: {diff:.2e}")
    assert diff <= 1e-4
    pooled = np.abs(_mean_pool(got, mask) - _mean_pool(want, mask)).max()
    print(f"max |mean-pooled fmjax - torch|: {pooled:.2e}")
    assert pooled <= 1e-4


def test_embed_equals_sentence_transformers_encode(fm, minilm_dir):
    """modules.json (Transformer, mean Pooling, Normalize) and
    sentence_bert_config.json's max_seq_length=256 honoured: a 300-token text
    is cut as SentenceTransformer cuts it, and every embedding is a unit vector."""
    st = pytest.importorskip("sentence_transformers")
    assert (fm.pooling, fm.normalize, fm.max_len) == ("mean", True, 256)
    long_text = " ".join(f"word{i} and more" for i in range(100))
    assert len(fm.tokenizer.encode(long_text)) > 300
    texts = [*SENTENCES, long_text]
    want = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(
        texts, batch_size=4
    )
    got = fm.embed(texts, batch_size=4)  # batches padded differently
    diff = np.abs(got - want).max()
    print(f"max |embed - SentenceTransformer.encode|: {diff:.2e}")
    assert got.shape == (len(texts), 384) and diff <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_sentence_transformers_modules_fmjax_cannot_run_are_refused(tmp_path):
    from fmjax.convert.sentence_transformers import embedding_fields
    from fmjax.errors import FormatError

    assert embedding_fields(tmp_path) == {
        "pooling": "mean",
        "max_seq_length": 0,
        "normalize": False,
    }
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "2_Dense",
            "type": "sentence_transformers.models.Dense",
        },
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        FormatError, match=r"Dense.*'2_Dense'.*Transformer, Pooling, Normalize"
    ):
        embedding_fields(tmp_path)


def test_logits_refused_without_mlm_head(fm, batch):
    assert fm.config.model.mlm_head is False and "mlm_bias" not in fm.params
    with pytest.raises(ValueError, match="no MLM head"):
        fm.logits(batch[0])


def test_save_hf_bert_reloads_in_transformers(fm, batch, tmp_path):
    ids, mask, want = batch
    out = hf.save_hf_bert(tmp_path, fm.config.model.to_dict(), fm.params, fm.tokenizer)
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    diff = np.abs(_torch_hidden(model.eval(), ids, mask) - want)[mask].max()
    print(f"max |hidden HF(round trip) - HF(original)|: {diff:.2e}")
    assert diff <= 1e-5
    reference = transformers.AutoTokenizer.from_pretrained(str(out))
    assert reference(SENTENCES[1])["input_ids"][1:-1] == fm.tokenizer.encode(
        SENTENCES[1]
    )


def test_hf_to_fmjax_and_back_keeps_params_exactly(fm, minilm_dir, tmp_path):
    exported = hf.hf_to_fmjax(minilm_dir, tmp_path / "fmjax")
    params, config = load_export(exported)
    assert config["name"] == "hf_import" and config["model"]["kind"] == "encoder"
    reloaded = fmjax.load(exported)
    assert isinstance(reloaded.tokenizer, WordPieceTokenizer)
    np.testing.assert_array_equal(
        reloaded.embed(SENTENCES[:2]), fm.embed(SENTENCES[:2])
    )
    back = hf.fmjax_to_hf(exported, tmp_path / "hf")
    _, params_back, _ = hf.load_hf_bert(back)
    flat = {k: np.asarray(v) for k, v in _flat(fm.params).items()}
    flat_back = _flat(params_back)
    assert flat.keys() == flat_back.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(flat_back[key], value, err_msg=key)


def _flat(params):
    from flax import traverse_util

    return traverse_util.flatten_dict(params, sep="/")


# ------------------------------------------- MLM head (tiny random HF checkpoint)


@pytest.fixture(scope="module")
def tiny_pretraining_dir(minilm_dir, tmp_path_factory):
    """A random BertForPreTraining (MLM + NSP heads + pooler) with MiniLM's vocab."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="gelu_new",
    )
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir, name), path)
    return str(path), model


def test_mlm_head_logits_match_torch_and_export_as_masked_lm(
    tiny_pretraining_dir, tmp_path
):
    path, model = tiny_pretraining_dir
    fm_tiny = fmjax.load(path)
    cfg = fm_tiny.config.model
    assert cfg.mlm_head is True and cfg.activation == "gelu_tanh"
    ids = fm_tiny.encode_batch(SENTENCES[:3])
    mask = ids != fm_tiny.tokenizer.pad_id
    with torch.no_grad():
        want = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).prediction_logits.numpy()
    assert np.abs(fm_tiny.logits(ids) - want)[mask].max() <= 1e-4

    out = hf.save_hf_bert(tmp_path, cfg.to_dict(), fm_tiny.params, fm_tiny.tokenizer)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BertForMaskedLM"]
    masked_lm, info = transformers.AutoModelForMaskedLM.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    with torch.no_grad():
        got = masked_lm.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).logits.numpy()
    assert np.abs(got - want)[mask].max() <= 1e-5


def test_unused_and_missing_tensors_are_named(tiny_pretraining_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = tiny_pretraining_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3)
    for name in ("config.json", "vocab.txt"):
        shutil.copy(os.path.join(path, name), tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        hf.load_hf_bert(tmp_path)
    assert "encoder.layer.1.output.dense.bias" in str(info.value)
    assert "encoder.layer.0.attention.self.rotary.weight" in str(info.value)


def test_hf_name_for_maps_every_encoder_param_to_a_distinct_tensor():
    import jax
    from flax import traverse_util

    from fmjax.convert.bert import tensor_name
    from fmjax.models.config import TransformerConfig
    from fmjax.models.text import TextEncoder

    cfg = TransformerConfig(
        vocab_size=11, d_model=8, num_layers=2, num_heads=2, head_dim=4, mlp_dim=16
    )
    tokens = np.zeros((1, 2), np.int32)
    shapes = jax.eval_shape(
        lambda: TextEncoder(cfg).init(jax.random.key(0), tokens)["params"]
    )
    paths = list(traverse_util.flatten_dict(shapes))
    names = {tensor_name(p) for p in paths}
    assert len(names) == len(paths) == 5 + 16 * 2 + 5  # embeddings, layers, head
    assert "cls.predictions.bias" in names
    assert (
        hf.hf_name_for(("layers_0", "attention", "query", "kernel"))
        == "encoder.layer.0.attention.self.query"
    )
    assert hf.hf_name_for(("layers_3", "mlp", "down")) == "encoder.layer.3.output.dense"
    with pytest.raises(KeyError, match="final_norm"):
        hf.hf_name_for(("final_norm", "scale"))


# -------------------------------------------------------------------- refusals


def test_refuses_pickled_weights_without_reading_them(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    # Not a valid pickle: refusing must not depend on trying to read it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    for load in (hf.load_hf_bert, fmjax.load):
        with pytest.raises(ValueError, match="safetensors only") as info:
            load(str(tmp_path))
        assert "pytorch_model.bin" in str(info.value)


def test_refuses_non_bert_config_naming_it(minilm_dir, tmp_path):
    with open(os.path.join(minilm_dir, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.is_hf_directory(tmp_path) and not hf.is_hf_directory(minilm_dir + "/x")
    with pytest.raises(ValueError, match="model_type='llama'.*'bert'.*'gpt2'"):
        fmjax.load(str(tmp_path))
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='gpt2': expected 'bert'"):
        hf.load_hf_bert(tmp_path)


def test_fmjax_to_hf_refuses_other_kinds(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"kind": "resnet"}}))
    with pytest.raises(ValueError, match="kind='resnet'.*encoders.*decoders.*ViTs"):
        hf.fmjax_to_hf(tmp_path, tmp_path / "out")


def test_fmjax_trained_encoder_exports_to_hf_masked_lm(tmp_path):
    """The `fmjax convert fmjax-to-hf` path for an fmjax BERT (SentencePiece)."""
    import flax.linen as nn
    import jax

    from fmjax.config import load_config
    from fmjax.data.tokenizer import train_sentencepiece
    from fmjax.export import export
    from fmjax.models import build_model

    tok = train_sentencepiece(SENTENCES * 4, 340, tmp_path / "spm.model")
    sizes = dict(vocab_size=340, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)
    config = load_config(
        "configs/bert_mlm.py:tiny", [f"model.{k}={v}" for k, v in sizes.items()]
    )
    tokens = np.zeros((1, 4), np.int32)
    params = build_model(config.model).init(jax.random.key(0), tokens)["params"]
    leaves, treedef = jax.tree.flatten(nn.unbox(params))
    rng = np.random.default_rng(0)  # off the trivial init: biases 0, LN scales 1
    noise = [0.1 * rng.standard_normal(x.shape, np.float32) for x in leaves]
    perturbed = [x + n for x, n in zip(leaves, noise, strict=True)]
    params = jax.tree.unflatten(treedef, perturbed)
    export(str(tmp_path / "run"), params, config, tok)
    out = hf.fmjax_to_hf(tmp_path / "run", tmp_path / "hf")
    ours = fmjax.load(str(tmp_path / "run"))
    ids = ours.encode_batch(SENTENCES[:3])
    mask = ids != tok.pad_id
    masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = masked_lm(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).logits.numpy()
    assert np.abs(ours.logits(ids) - want)[mask].max() <= 1e-4
    reloaded = fmjax.load(out)  # an HF directory with a SentencePiece tokenizer
    assert reloaded.tokenizer.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])
    np.testing.assert_array_equal(reloaded.logits(ids), ours.logits(ids))


def test_convert_and_embed_commands(fm, minilm_dir, tmp_path, capsys):
    from fmjax import cli

    out = tmp_path / "fmjax_minilm"
    assert cli.main(["convert", "hf-to-fmjax", str(minilm_dir), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    lines = tmp_path / "in.txt"
    sentences = ["A man is eating food.", "Shares fell on Monday."]
    lines.write_text("\n".join(sentences) + "\n")
    for source in (str(minilm_dir), str(out)):
        emb = tmp_path / "emb.npy"
        args = ["embed", "--workdir", source, "--input", str(lines)]
        assert cli.main([*args, "--output", str(emb)]) == 0
        np.testing.assert_allclose(np.load(emb), fm.embed(sentences), atol=1e-6)
    back = tmp_path / "hf_again"
    assert cli.main(["convert", "fmjax-to-hf", str(out), str(back)]) == 0
    reloaded = transformers.AutoModel.from_pretrained(back).eval()
    assert reloaded.config.num_hidden_layers == 6
