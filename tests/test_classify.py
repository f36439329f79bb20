"""Fine-tuning a classifier with each adaptation method, end to end.

The base is a random tiny BERT in an HF directory (conftest `tiny_bert_dir`), so
every run takes seconds; the pretrained all-MiniLM-L6-v2 runs are the study in
bench/adaptation_study.py (docs/adaptation.md).
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file

import fmjax
from fmjax.adapt.lora import lora_param_paths
from fmjax.adapt.masks import count_params
from fmjax.adapt.methods import Adaptation, trainable_line
from fmjax.config import ConfigError, load_config
from fmjax.data.labeled import load_labeled_source
from fmjax.models.heads import pool
from fmjax.objectives import classification_loss
from fmjax.train.loop import train

CONFIG = os.path.join(REPO, "configs", "classify.py")
EVAL_BATCHES = 4
BATCH = 8
ONE_DEVICE = {"mesh.num_devices": 1}
# QLoRA dequantises to bf16 and computes in bf16 (the others in f32), with a
# constant learning rate so a resumed run can be compared with this one.
QLORA = {
    "adapt.compute_dtype": "bfloat16",
    "model.dtype": "bfloat16",
    "optimizer.schedule": "constant",
}


def _config(variant, base, data_dir, **extra):
    values = {
        "init.model": base,
        "data.data_dir": str(data_dir),
        "data.seq_len": 32,
        "data.batch_size": BATCH,
        "data.train_examples": 64,
        "data.test_split": "",
        "train.steps": 3,
        "train.eval_batches": EVAL_BATCHES,
        "train.progress": False,
        "optimizer.warmup_steps": 1,
        "adapt.prefix_tokens": 3,
        "adapt.prompt_tokens": 4,
        **extra,
    }
    return load_config(f"{CONFIG}:{variant}", [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, data_dir, tmp_path_factory):
    """One short run per method (trained once for the module)."""
    out = {}
    extra = {
        # full shards the batch over 2 of the test devices; the others run on
        # one device, which compiles faster (tests/test_scale.py covers the
        # meshes; an 8-way program took this fixture 124 s instead of ~80).
        "full": {"mesh.num_devices": 2},
        "lora": ONE_DEVICE,
        "qlora": {**ONE_DEVICE, **QLORA},
        "prefix": ONE_DEVICE,
        "prompt": ONE_DEVICE,
    }
    for method in ("full", "lora", "qlora", "prefix", "prompt"):
        workdir = str(tmp_path_factory.mktemp(method))
        config = _config(method, tiny_bert_dir, data_dir, **extra.get(method, {}))
        out[method] = (workdir, train(config, workdir))
    return out


def _validation(data_dir, n):
    source = load_labeled_source("rotten_tomatoes", "validation", data_dir=data_dir)
    rows = [source[i] for i in range(n)]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows])


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prefix", "prompt"])
def test_loaded_run_classifies_as_its_final_eval(runs, data_dir, method):
    """fmjax.load(workdir) rebuilds base + adapter + head: its predictions on the
    eval rows give exactly the accuracy the training loop measured on them."""
    workdir, summary = runs[method]
    texts, labels = _validation(data_dir, EVAL_BATCHES * BATCH)
    m = fmjax.load(workdir)
    probs = m.predict_proba(texts)
    assert probs.shape == (len(texts), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    accuracy = float(np.mean(probs.argmax(1) == labels))
    assert accuracy == pytest.approx(summary["eval"]["accuracy"], abs=1e-6)
    predictions = m.classify(texts[:3])
    assert [p["label"] for p in predictions] == [
        ["rotten", "fresh"][i] for i in probs[:3].argmax(1)
    ]
    assert summary["train_examples"] == 64


def test_trainable_counts_follow_each_method(runs, tiny_bert_dir):
    from fmjax.convert.hf import load_hf_bert

    d, layers, kv_width, classes = 32, 2, 2 * 16, 2
    head = d * classes + classes
    base = count_params(load_hf_bert(tiny_bert_dir)[1])
    expected = {
        "full": base + head,
        "lora": layers * 2 * 8 * (d + kv_width) + head,  # q, v: r * (in + out)
        "qlora": layers * 2 * 8 * (d + kv_width) + head,
        "prefix": 2 * layers * 3 * kv_width + head,  # K and V, 3 slots
        "prompt": 4 * d + head,
    }
    for method, (_, summary) in runs.items():
        report = summary["params"]
        assert report["trainable_params"] == expected[method], method
        adapters = expected[method] - (base + head if method == "full" else head)
        assert report["all_params"] == base + head + adapters
        assert report["optimizer_bytes"] == 2 * 4 * expected[method] + 8  # mu, nu
    assert runs["lora"][1]["params"]["trainable_percent"] < 1.0
    q = runs["qlora"][1]["params"]
    # 4-bit codes are 1/8 of f32; absmax blocks and the double-quant groups add
    # the rest (MiniLM's kernels: 1/7.75, docs/adaptation.md; these tiny ones
    # pad a 256-block group per kernel).
    assert (
        5 * q["quantized_bytes"] <= q["quantized_bytes_f32"] < 8 * q["quantized_bytes"]
    )
    assert q["frozen_bytes"] < runs["lora"][1]["params"]["frozen_bytes"]


def test_adapter_exports_and_checkpoints_hold_no_base(runs):
    for method in ("lora", "qlora", "prefix", "prompt"):
        workdir, _ = runs[method]
        export = os.path.join(workdir, "export")
        assert not os.path.exists(os.path.join(export, "model.safetensors"))
        names = set(load_file(os.path.join(export, "adapter.safetensors")))
        assert {"model.classifier.kernel", "model.classifier.bias"} <= names
        assert all(n.startswith(("model.classifier.", f"{method}.")) for n in names)
    full_size = os.path.getsize(
        os.path.join(runs["full"][0], "export", "model.safetensors")
    )
    lora_size = os.path.getsize(
        os.path.join(runs["lora"][0], "export", "adapter.safetensors")
    )
    assert lora_size * 20 < full_size


def test_several_adapters_share_one_base(runs, tiny_bert_dir, data_dir):
    texts, _ = _validation(data_dir, 8)
    alone = {k: fmjax.load(runs[k][0]).predict_proba(texts) for k in ("lora", "prompt")}
    m = fmjax.load(tiny_bert_dir)
    base_params = m.params
    m.load_adapter(runs["lora"][0], name="lora")
    m.load_adapter(runs["prompt"][0], name="prompt")
    assert m.adapters == ["lora", "prompt"] and m.active_adapter == "prompt"
    np.testing.assert_allclose(m.predict_proba(texts), alone["prompt"], atol=1e-6)
    m.set_adapter("lora")
    np.testing.assert_allclose(m.predict_proba(texts), alone["lora"], atol=1e-6)
    m.set_adapter(None)
    assert m.params is base_params
    with pytest.raises(ValueError, match="no classifier head"):
        m.classify(texts)
    with pytest.raises(KeyError, match="no adapter 'x'"):
        m.set_adapter("x")
    with pytest.raises(ValueError, match="whole-model export"):
        m.load_adapter(runs["full"][0])


def test_adapter_run_resumes_exactly(runs, tiny_bert_dir, data_dir, tmp_path):
    """Checkpoints hold no base: on resume it is rebuilt from init.model (here
    re-quantised to NF4). With a constant learning rate, 2 steps then 1 more are
    the same schedule as the module's 3-step QLoRA run."""

    def config(steps, method="qlora"):
        extra = {**ONE_DEVICE, **QLORA, "train.steps": steps}
        return _config(method, tiny_bert_dir, data_dir, **extra)

    straight_dir, straight = runs["qlora"]
    resumed_dir = str(tmp_path / "b")
    train(config(2), resumed_dir)
    resumed = train(config(3), resumed_dir)
    assert resumed["eval"] == straight["eval"]
    a = load_file(os.path.join(straight_dir, "export", "adapter.safetensors"))
    b = load_file(os.path.join(resumed_dir, "export", "adapter.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ConfigError, match="adapt.method: 'qlora' -> 'lora'"):
        train(config(5, "lora"), resumed_dir)


def test_sentence_pairs_from_a_jsonl_file(tiny_bert_dir, data_dir, tmp_path):
    rows = [
        {"premise": f"the film is {w}", "hypothesis": h, "label": lab}
        for w in ("good", "bad", "long", "short")
        for h, lab in (("it is good", "yes"), ("it is bad", "no"))
    ] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = _config(
        "lora",
        tiny_bert_dir,
        data_dir,
        **{
            "data.name": f"jsonl:{path}",
            "data.text_fields": "('premise', 'hypothesis')",
            "data.train_examples": 0,
            "data.test_split": "",
            "train.eval_batches": 0,
            **ONE_DEVICE,
        },
    )
    summary = train(config, str(tmp_path / "run"))
    assert summary["eval"]["count"] > 0
    m = fmjax.load(str(tmp_path / "run"))
    out = m.classify([("the film is good", "it is good")])
    assert out[0]["label"] in ("no", "yes")
    with pytest.raises(ValueError, match="reads 2 text field"):
        m.classify(["only one text"])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"adapt.method": "adapter"}, "adapt.method='adapter'"),
        ({"init.model": "/nonexistent"}, "init.model='/nonexistent' does not exist"),
        ({"init.model": ""}, "init.model is empty"),
        ({"data.train_examples": 10**6}, "data.train_examples=1000000"),
        ({"model.num_classes": 3}, "model.num_classes=3 but the data has 2"),
        ({"data.seq_len": 100}, "longer than the model's max_len=64"),
        ({"adapt.lora_targets": "('nothing',)"}, "match no param"),
    ],
)
def test_bad_configs_fail_before_compute(
    tiny_bert_dir, data_dir, tmp_path, override, message
):
    config = _config("lora", tiny_bert_dir, data_dir, **override)
    with pytest.raises((ConfigError, ValueError), match=message):
        train(config, str(tmp_path))


def test_architecture_is_not_overridable(tiny_bert_dir, data_dir, tmp_path):
    config = _config("lora", tiny_bert_dir, data_dir)
    config.model.d_model = 64
    with pytest.raises(ConfigError, match="model.d_model=64 cannot be set"):
        train(config, str(tmp_path))


def test_classification_loss_and_mean_pooling_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    weights = np.array([1, 1, 1, 0, 1], np.float32)
    _, m = classification_loss(logits, labels, weights)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -logp[np.arange(5), labels]
    assert float(m["loss_sum"]) == pytest.approx(float((nll * weights).sum()), 1e-5)
    assert float(m["count"]) == 4
    correct = (logits.argmax(1) == labels) * weights
    assert float(m["correct"]) == correct.sum()
    hidden = rng.normal(size=(2, 4, 3)).astype(np.float32)
    seg = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = np.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    np.testing.assert_allclose(pool(hidden, seg, "mean"), expected, rtol=1e-6)
    np.testing.assert_allclose(pool(hidden, seg, "cls"), hidden[:, 0])


def _abstract_split(variant, shape, **adapt_changes):
    """(adaptation, trained, frozen) for a classifier of `shape`, from shapes only
    (nothing is allocated)."""
    from fmjax.config import ConfigDict
    from fmjax.models.config import TransformerConfig
    from fmjax.models.text import TextEncoder

    cfg = TransformerConfig(**shape, mlm_head=False, num_classes=2)
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    params = jax.eval_shape(TextEncoder(cfg).init, jax.random.PRNGKey(0), tokens)
    adapt = load_config(f"{CONFIG}:{variant}").adapt.to_dict()
    adaptation = Adaptation.from_config(ConfigDict({**adapt, **adapt_changes}), cfg)
    trained, frozen = jax.eval_shape(
        adaptation.split, nn.unbox(params["params"]), jax.random.PRNGKey(1)
    )
    return adaptation, trained, frozen


TINY_SHAPE = dict(
    vocab_size=50, d_model=8, num_layers=2, num_heads=2, head_dim=4, mlp_dim=16
)
MINILM_SHAPE = dict(
    vocab_size=30522, d_model=384, num_layers=6, num_heads=12, head_dim=32, mlp_dim=1536
)


def test_lora_targets_all_linear_adapts_every_projection():
    _, trained, frozen = _abstract_split("lora", TINY_SHAPE, lora_targets="all-linear")
    modules = {p.rsplit("/", 1)[0] for p in lora_param_paths(trained["lora"])}
    assert len(modules) == 2 * 6  # q, k, v, out, up, down per layer
    assert set(trained["model"]) == {"classifier"} and "classifier" not in frozen


def test_trainable_line_reads_like_peft():
    summary = {
        "trainable_params": 1234,
        "all_params": 100000,
        "trainable_percent": 1.234,
    }
    assert trainable_line(summary) == "trainable parameters: 1,234 / 100,000 (1.2340%)"


def test_lora_run_exports_to_peft_with_same_hidden_states(
    runs, tiny_bert_dir, tmp_path
):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from fmjax.cli import main

    out = str(tmp_path / "peft")
    assert main(["convert", "lora-to-peft", runs["lora"][0], out]) == 0
    base = transformers.AutoModel.from_pretrained(tiny_bert_dir).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    m = fmjax.load(runs["lora"][0])
    ids = m.encode_batch(["a fine film", "dull and long, a waste of a good cast"])
    mask = ids != m.tokenizer.pad_id
    with torch.no_grad():
        torch_hidden = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).last_hidden_state.numpy()
    ours = m.hidden(ids)
    np.testing.assert_allclose(ours[mask], torch_hidden[mask], atol=1e-4)
    with pytest.raises(ValueError, match="lora-to-peft needs"):
        from fmjax.adapt.peft import export_run_to_peft

        export_run_to_peft(runs["prompt"][0], str(tmp_path / "x"))


def test_eval_command_scores_the_latest_checkpoint(runs, capsys):
    """`fmjax eval` rebuilds the run from its saved config (the resolved model,
    the adapter over the base from init.model) and matches the final eval."""
    from fmjax.cli import main

    workdir, summary = runs["prefix"]
    assert main(["eval", "--workdir", workdir]) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.index("{") :])
    assert out["accuracy"] == pytest.approx(summary["eval"]["accuracy"], abs=1e-6)
    assert out["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)


@pytest.mark.parametrize("embeddings", [False, True])
def test_qlora_base_bytes_at_minilm_size(embeddings):
    """NF4 with double quantisation stores all-MiniLM-L6-v2's kernels in under
    1/7 of their f32 bytes; with quantize_embeddings the whole frozen base too."""
    adaptation, trained, frozen = _abstract_split(
        "qlora", MINILM_SHAPE, quantize_embeddings=embeddings
    )
    report = adaptation.summary(trained, frozen)
    assert 7 * report["quantized_bytes"] <= report["quantized_bytes_f32"]
    whole = 7 * report["frozen_bytes"] <= report["frozen_bytes_f32"]
    assert whole == embeddings  # f32 embeddings are half of MiniLM's params
    assert report["trainable_percent"] < 1.0


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_classifier_gives_the_same_outputs(runs, data_dir, tmp_path, method):
    texts, _ = _validation(data_dir, 8)
    m = fmjax.load(runs[method][0])
    merged_dir = m.save_merged(str(tmp_path / "merged"))
    merged = fmjax.load(merged_dir)
    assert merged.active_adapter is None
    np.testing.assert_allclose(
        merged.predict_proba(texts), m.predict_proba(texts), atol=1e-5
    )
    with pytest.raises(ValueError, match="nothing to merge"):
        fmjax.load(runs["prompt"][0]).save_merged(str(tmp_path / "no"))
