"""HF GPT-2 interop: a random GPT2LMHeadModel with GPT-2 124M's widths (d=768,
12 heads, MLP 3072, 1024 positions; 2 layers) and a byte-level BPE tokenizer
trained here, against fmjax after `fmjax convert hf-to-fmjax`: logits, greedy
generation, export back to HF, tokenizer ids, and the refusals."""

import glob
import inspect
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fmjax  # noqa: E402
from fmjax import cli  # noqa: E402
from fmjax.convert import gpt2, hf  # noqa: E402
from fmjax.data.bpe import END_OF_TEXT, ByteLevelBPETokenizer  # noqa: E402
from fmjax.data.tokenizer import load_tokenizer  # noqa: E402
from fmjax.errors import FormatError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 2048  # 2047 trained tokens, then <|endoftext|> last, as in GPT-2
TEXTS = [
    "Hello, world!",
    "Café naïve Zürich: Ångström's résumé.",
    "It costs $1,234.56 (about 12%) since 1999-01-02.",
    "☃ snowman and 🤖 robot, 中文字符 and 日本語のテキスト",
    "  leading spaces,\ttabs and\nnewlines  \r\n",
    "The model reads packed batches of tokens and writes a checkpoint.",
]
TOKENIZER_TEXTS = TEXTS + ["", "x" * 300, "don't stop-believing; e-mail a.b@c.com"]


def _train_tokenizer() -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE (no prefix space) trained on the repo's docs."""
    from fmjax.bench_eval import train_bpe

    docs = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    texts = [open(p, encoding="utf-8").read() for p in docs]
    backend = train_bpe(texts, VOCAB_SIZE)
    assert backend.get_vocab_size() == VOCAB_SIZE
    return backend


def _save_pretrained(model, path) -> None:
    # transformers 5 always writes safetensors; 4.x needs to be asked.
    params = inspect.signature(model.save_pretrained).parameters
    safe = {"safe_serialization": True} if "safe_serialization" in params else {}
    model.save_pretrained(path, **safe)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def _perturb(model, scale: float = 0.1) -> None:
    """Off the trivial init (biases 0, LayerNorm scales 1), so those map too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """(HF directory, eval-mode GPT2LMHeadModel, the trained tokenizers backend)."""
    backend = _train_tokenizer()
    eos = backend.token_to_id(END_OF_TEXT)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=1024,
        n_embd=768,
        n_layer=2,
        n_head=12,
        # Wider than GPT-2's 0.02, so logits spread out (greedy argmax has no
        # near-ties), yet not so wide that float32 rounding alone, in HF as in
        # fmjax, passes 1e-4 (it does at 0.2: both are 3e-4 off float64).
        initializer_range=0.05,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    _perturb(model)
    path = tmp_path_factory.mktemp("hf_gpt2")
    _save_pretrained(model, path)
    backend.save(str(path / "tokenizer.json"))
    return str(path), model, backend


@pytest.fixture(scope="module")
def exported(hf_gpt2, tmp_path_factory):
    """`fmjax convert hf-to-fmjax` of the HF directory."""
    out = tmp_path_factory.mktemp("fmjax") / "export"
    assert cli.main(["convert", "hf-to-fmjax", hf_gpt2[0], str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def fm(exported):
    return fmjax.load(exported)


def _hf_logits(model, ids_BL, mask_BL):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids_BL, dtype=torch.long),
            attention_mask=torch.tensor(mask_BL, dtype=torch.long),
        ).logits.numpy()


@pytest.fixture(scope="module")
def batch(fm, hf_gpt2):
    """Right-padded ids of TEXTS (no special tokens) and HF's logits of them."""
    tok = fm.tokenizer
    rows = [tok.encode(t) for t in TEXTS]
    assert all(tok.eos_id not in r for r in rows)  # eos doubles as padding
    ids = np.full((len(rows), max(map(len, rows))), tok.pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    mask = ids != tok.pad_id
    assert (~mask).any(), "the batch must contain padding"
    return ids, mask, _hf_logits(hf_gpt2[1], ids, mask)


# --------------------------------------------------------------------- parity


def test_converted_logits_match_hf(fm, hf_gpt2, batch):
    ids, mask, want = batch
    cfg = fm.config.model
    assert (cfg.kind, cfg.d_model, cfg.num_heads, cfg.mlp_dim, cfg.max_len) == (
        "decoder",
        768,
        12,
        3072,
        1024,
    )
    assert cfg.activation == "gelu_tanh" and cfg.layer_norm_eps == 1e-5
    assert isinstance(fm.tokenizer, ByteLevelBPETokenizer)
    got = fm.logits(ids)
    diff = np.abs(got - want)[mask].max()
    print(f"max |logits fmjax - HF|: {diff:.2e} (logit std {want[mask].std():.1f})")
    assert diff <= 1e-4
    # The HF directory loads directly too, to the same params.
    direct = fmjax.load(hf_gpt2[0])
    np.testing.assert_array_equal(direct.logits(ids), got)
    # <|endoftext|> inside a row (GPT-2's bos, eos and pad) is a token, as in HF.
    eos = np.full((1, 1), fm.tokenizer.eos_id, np.int32)
    with_eos = np.concatenate([eos, ids[:1, :5], eos, ids[:1, 5:9]], axis=1)
    want_eos = _hf_logits(hf_gpt2[1], with_eos, np.ones_like(with_eos, bool))
    assert np.abs(fm.logits(with_eos) - want_eos).max() <= 1e-4


def test_greedy_generation_matches_hf_generate(fm, hf_gpt2):
    from fmjax.inference.generate import Generator

    _, model, _ = hf_gpt2
    tok = fm.tokenizer
    prompts = [tok.encode(t) for t in TEXTS[:4]]  # no BOS, as HF is given them
    generator = Generator(fm.module, fm.params, tok, max_len=1024)
    ours = generator.generate_ids(prompts, 32)  # one left-padded batch
    distinct = set()
    for prompt, got in zip(prompts, ours, strict=True):
        inputs = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )
        want = out[0, len(prompt) :].tolist()
        want = want[: want.index(tok.eos_id)] if tok.eos_id in want else want
        assert got == want, tok.decode(prompt)
        print(f"{len(got)} greedy tokens equal HF's: {tok.decode(got)!r}")
        distinct.update(got)
    assert len(distinct) > 4, "degenerate model: the comparison would be weak"


def test_export_to_hf_reloads_with_identical_logits(fm, exported, hf_gpt2, batch):
    path, _, _ = hf_gpt2
    ids, mask, want = batch
    back = os.path.join(os.path.dirname(exported), "hf_again")
    assert cli.main(["convert", "fmjax-to-hf", exported, back]) == 0
    with open(os.path.join(back, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["eos_token_id"] == config["pad_token_id"] == VOCAB_SIZE - 1
    model, info = transformers.GPT2LMHeadModel.from_pretrained(
        back, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    diff = np.abs(_hf_logits(model.eval(), ids, mask) - want)[mask].max()
    print(f"max |logits HF(round trip) - HF(original)|: {diff:.2e}")
    assert diff <= 1e-5
    # Params survive HF -> fmjax -> HF bit for bit.
    _, original, _ = hf.load_hf_model(path)
    _, again, _ = hf.load_hf_model(back)
    flat, flat_again = (_flat(p) for p in (original, again))
    assert flat.keys() == flat_again.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(flat_again[key], value, err_msg=key)
    # The exported tokenizer gives the same ids in transformers.
    reference = transformers.AutoTokenizer.from_pretrained(back)
    assert reference.eos_token == reference.pad_token == END_OF_TEXT
    for text in TOKENIZER_TEXTS:
        assert reference(text)["input_ids"] == fm.tokenizer.encode(text), text
    # bench decode's HF twin of fmjax params (fmjax.convert.gpt2.to_torch_model).
    twin = gpt2.to_torch_model(fm.config.model.to_dict(), fm.params).eval()
    assert np.abs(_hf_logits(twin, ids, mask) - want)[mask].max() <= 1e-5


def _flat(params):
    from flax import traverse_util

    return traverse_util.flatten_dict(params, sep="/")


# ------------------------------------------------------------------ tokenizer


def test_bpe_ids_equal_gpt2_tokenizer_fast(hf_gpt2, tmp_path):
    path, _, backend = hf_gpt2
    eos = VOCAB_SIZE - 1
    reference = transformers.GPT2TokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json"),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )
    # GPT-2's original files: vocab.json (with <|endoftext|>) + merges.txt.
    original = tmp_path / "vocab_merges"
    original.mkdir()
    backend.model.save(str(original))
    vocab = backend.get_vocab(with_added_tokens=True)
    (original / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    for source in (path, str(original)):
        tok = load_tokenizer(source)
        assert isinstance(tok, ByteLevelBPETokenizer), source
        assert tok.vocab_size == VOCAB_SIZE
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id) == (
            (eos,) * 5
        )
        assert tok.special_ids == (eos,)
        for text in TOKENIZER_TEXTS:
            ids = tok.encode(text)
            assert ids == reference(text)["input_ids"], text
            assert tok.decode(ids) == text  # byte level: exact
            assert tok.decode([eos, *ids, eos, eos]) == text  # specials dropped
    # Non-ASCII text falls back to bytes, never to an unknown token.
    assert len(tok.encode("☃")) == len("☃".encode()) and eos not in tok.encode("☃")
    assert tok.encode(f"a{END_OF_TEXT}b") == reference(f"a{END_OF_TEXT}b")["input_ids"]


def test_bpe_save_reloads_in_fmjax_and_transformers(hf_gpt2, tmp_path):
    tok = load_tokenizer(hf_gpt2[0])
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert fast.eos_token_id == again.eos_id == tok.eos_id
    for text in TOKENIZER_TEXTS:
        assert again.encode(text) == tok.encode(text) == fast(text)["input_ids"]


# ------------------------------------------------- other checkpoint layouts


def _tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        initializer_range=0.2,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return transformers.GPT2Config(**{**values, **overrides})


def _tiny_dir(model, hf_gpt2, path) -> str:
    _save_pretrained(model, path)
    shutil.copy(os.path.join(hf_gpt2[0], "tokenizer.json"), path)
    return str(path)


@pytest.mark.parametrize("layout", ["GPT2Model", "untied GPT2LMHeadModel"])
def test_prefixless_and_untied_checkpoints(layout, hf_gpt2, batch, tmp_path):
    ids, mask, _ = batch
    torch.manual_seed(1)
    if layout == "GPT2Model":  # names without `transformer.`, no LM head
        model = transformers.GPT2Model(_tiny_config()).eval()
    else:
        config = _tiny_config(tie_word_embeddings=False)
        model = transformers.GPT2LMHeadModel(config).eval()
    _perturb(model)
    ours = fmjax.load(_tiny_dir(model, hf_gpt2, tmp_path))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    if layout == "GPT2Model":
        assert ours.config.model.tie_embeddings
        got, want = ours.hidden(ids), out.last_hidden_state.numpy()
    else:
        assert not ours.config.model.tie_embeddings and "lm_head" in ours.params
        got, want = ours.logits(ids), out.logits.numpy()
    assert np.abs(got - want)[mask].max() <= 1e-4


def test_missing_unused_and_untied_head_tensors_are_named(hf_gpt2, tmp_path):
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(2)
    path = _tiny_dir(transformers.GPT2LMHeadModel(_tiny_config()), hf_gpt2, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    # Old checkpoints' causal-mask buffers are ignored.
    tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    tensors["transformer.h.0.attn.masked_bias"] = np.float32(-1e4) * np.ones(1)
    save_file(tensors, weights)
    assert hf.load_hf_model(path)[0]["kind"] == "decoder"

    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    save_file(tensors, weights)
    with pytest.raises(FormatError, match="lm_head.weight differs from wte.weight"):
        hf.load_hf_model(path)

    del tensors["lm_head.weight"], tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, weights)
    with pytest.raises(FormatError) as info:
        fmjax.load(path)
    assert "h.1.mlp.c_fc.bias" in str(info.value)
    assert "h.0.attn.rotary.weight" in str(info.value)


def test_every_decoder_param_maps_to_a_gpt2_tensor():
    from fmjax.convert.hf import _param_shapes

    model_config = gpt2.model_config_from_hf(
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}
    )
    paths = list(_param_shapes(model_config))
    names = {gpt2.tensor_name(p) for p in paths}
    assert len(names) == len(paths) == 4 + 16 * 2  # q/k/v: thirds of c_attn
    fake = {p: np.zeros(s, np.float32) for p, s in _param_shapes(model_config).items()}
    tensors = gpt2.hf_from_params(fake)
    assert len(tensors) == 4 + 12 * 2  # the q/k/v kernels and biases fused
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (64, 3 * 64)
    back = gpt2.params_from_hf(gpt2.strip_prefix(tensors), _param_shapes(model_config))
    assert set(back) == set(fake)
    with pytest.raises(KeyError, match="mlm_bias"):
        gpt2.tensor_name(("mlm_bias",))


# -------------------------------------------------------------------- refusals


def test_refuses_pickled_weights(hf_gpt2, tmp_path):
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(hf_gpt2[0], name), tmp_path)
    # Not a valid pickle: refusing must not depend on trying to read it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    for load in (hf.load_hf_model, hf.load_hf_gpt2, fmjax.load):
        with pytest.raises(FormatError, match="safetensors only") as info:
            load(str(tmp_path))
        assert "pytorch_model.bin" in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
        ("activation_function", "relu"),
    ],
)
def test_refuses_unsupported_config_naming_the_key(key, value, hf_gpt2, tmp_path):
    with open(os.path.join(hf_gpt2[0], "config.json")) as f:
        config = json.load(f)
    config[key] = value
    # config.json alone: the refusal comes before any weights are read.
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=f"{key}={value!r}"):
        fmjax.load(str(tmp_path))


def test_export_refuses_what_gpt2_cannot_express():
    base = dict(kind="decoder", vocab_size=11, d_model=8, num_layers=1)
    base.update(num_heads=2, head_dim=4, mlp_dim=16)
    for change, named in (
        ({"position": "rope"}, "position='rope'"),
        ({"num_kv_heads": 1}, "num_kv_heads=1"),
        ({"head_dim": 8}, "num_heads\\*head_dim=16"),
    ):
        with pytest.raises(FormatError, match=named):
            gpt2.hf_config_from_model({**base, **change})
    with pytest.raises(FormatError, match="kind='encoder'"):
        gpt2.hf_config_from_model({**base, "kind": "encoder"})


# ------------------------------------------------------------------ LoRA -> PEFT


@pytest.mark.parametrize("targets", ["query-value", "all-linear"])
def test_decoder_lora_exports_to_peft_with_the_same_logits(
    targets, hf_gpt2, batch, data_dir, tmp_path
):
    """Continued pre-training of the HF GPT-2 with LoRA (query/value, merged
    into one c_attn adapter in PEFT; or every projection, with c_attn's rank in
    rank_pattern), exported with `fmjax convert lora-to-peft`: peft.PeftModel
    on the HF model gives fmjax's logits, and fmjax.load reads the PEFT
    directory back to the same model."""
    peft = pytest.importorskip("peft")
    from fmjax.config import load_config
    from fmjax.train.loop import train

    hf_dir, hf_model, _ = hf_gpt2
    workdir = str(tmp_path / "lora")
    overrides = {
        "init.model": hf_dir,
        "data.data_dir": str(data_dir),
        "data.seq_len": 32,
        "data.batch_size": 8,
        "train.steps": 3,
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.progress": False,
        "adapt.method": "lora",
        "adapt.lora_dropout": 0.0,
        "optimizer.learning_rate": 0.05,
        "optimizer.warmup_steps": 0,
        "mesh.num_devices": 1,
    }
    if targets == "all-linear":
        overrides["adapt.lora_targets"] = "all-linear"
    config = load_config(
        "configs/gpt_lm.py:tiny", [f"--config.{k}={v}" for k, v in overrides.items()]
    )
    train(config, workdir)
    peft_dir = str(tmp_path / "peft")
    assert cli.main(["convert", "lora-to-peft", workdir, peft_dir]) == 0
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        peft_config = json.load(f)
    assert peft_config["fan_in_fan_out"] and peft_config["base_model_name_or_path"]
    if targets == "query-value":
        assert peft_config["target_modules"] == ["attn.c_attn"]
        assert peft_config["r"] == 2 * config.adapt.lora_rank

    ids, mask, base_logits = batch
    ours = fmjax.load(workdir).logits(ids)
    assert np.abs(ours - base_logits)[mask].max() > 1e-3  # the adapter did something
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    theirs_model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        theirs = theirs_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).logits.numpy()
    diff = np.abs(ours - theirs)[mask].max()
    print(f"{targets}: max |logits fmjax LoRA - PEFT|: {diff:.2e}")
    assert diff <= 1e-4
    again = fmjax.load(peft_dir).logits(ids)
    assert np.abs(again - theirs)[mask].max() <= 1e-4
