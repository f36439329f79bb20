"""End-to-end: train, evaluate, resume exactly after SIGKILL, SIGTERM, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file

import fmjax
from fmjax import cli
from fmjax.config import load_config
from fmjax.train.loop import train
from fmjax.train.metrics import read_metrics


def tiny_overrides(data_dir, **extra):
    values = {
        "train.steps": 12,
        "train.log_every": 2,
        "train.eval_every": 6,
        "train.eval_batches": 4,
        "checkpoint.every": 4,
    }
    return conftest.tiny_overrides(data_dir, **{**values, **extra})


def _curve(workdir):
    """The loss curve: every logged metric except wall-clock throughput."""
    return [
        {k: v for k, v in r.items() if k != "tokens_per_s"}
        for r in read_metrics(workdir)
    ]


def _params(workdir):
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


@pytest.fixture(scope="session")
def gpt_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gpt"))
    config = load_config("configs/gpt_lm.py:tiny", tiny_overrides(data_dir))
    summary = train(config, workdir)
    return workdir, summary, _curve(workdir)


def test_train_writes_everything_and_loss_falls(gpt_run):
    workdir, summary, _ = gpt_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert summary["steps"] == 12 and not summary["preempted"]
    # The run ends with a greedy continuation of held-out text (as generate does).
    sample = summary["sample"]
    assert len(sample["prompt"].split()) == 6 and sample["continuation"]
    again = fmjax.load(workdir).generate([sample["prompt"]], max_new_tokens=24)
    assert again == [sample["continuation"]]
    records = read_metrics(workdir)
    evals = [r for r in records if r["split"] == "eval"]
    trains = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert [r["step"] for r in trains] == list(range(2, 13, 2))
    for key in ("loss", "accuracy", "perplexity", "grad_norm", "param_norm"):
        assert all(np.isfinite(r[key]) for r in trains), key
    # An untrained model is near log(V); 12 steps on real text must clearly improve.
    assert abs(evals[0]["loss"] - np.log(1000)) < 0.5
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    assert np.isclose(evals[-1]["perplexity"], np.exp(evals[-1]["loss"]), rtol=1e-4)


def test_eval_command_matches_final_eval(gpt_run, capsys):
    workdir, summary, _ = gpt_run
    assert cli.main(["eval", "--workdir", workdir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12
    assert np.isclose(result["loss"], summary["eval"]["loss"], rtol=1e-5)


def test_load_api_gives_logits_and_embeddings(gpt_run):
    workdir, _, _ = gpt_run
    model = fmjax.load(workdir)
    text = "The government said on Monday"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    ids = model.encode_batch([text, "Shares fell."])
    logits = model.logits(ids)
    assert logits.shape == (2, ids.shape[1], model.config.model.vocab_size)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # Right padding must not change the logits of the real tokens (causal model).
    alone = model.logits(ids[1:2, : len(model.tokenizer.encode("Shares fell.")) + 2])
    np.testing.assert_allclose(alone[0], logits[1, : alone.shape[1]], atol=1e-5)
    emb = model.embed(["a", "b c", "d e f"])
    assert emb.shape == (3, 64) and emb.dtype == np.float32


def test_generate_and_stream_from_a_trained_decoder(gpt_run, capsys):
    """Text generation from a workdir (API and CLI): greedy is deterministic and
    continues as the model's own argmax does, the streamed pieces join to the
    generated text, stop strings cut it exactly, and an encoder refuses."""
    workdir, _, _ = gpt_run
    model = fmjax.load(workdir)
    prompts = ["The government said", "Shares in the company"]
    texts = model.generate(prompts, max_new_tokens=12)
    assert texts == model.generate(prompts, max_new_tokens=12, batch_size=1)
    tok = model.tokenizer
    ids = [tok.bos_id, *tok.encode(prompts[0])]
    first = int(np.argmax(model.logits(np.asarray([ids]))[0, -1]))
    assert tok.encode(texts[0])[:1] == tok.encode(tok.decode([first]))[:1]
    pieces = list(model.stream(prompts[0], max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == texts[0]
    stop = texts[0][4:7]
    cut = model.generate(prompts[:1], max_new_tokens=12, stop=[stop])[0]
    assert cut == texts[0][: texts[0].find(stop)]
    assert "".join(model.stream(prompts[0], max_new_tokens=12, stop=[stop])) == cut
    sampled = model.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=5)
    assert sampled == model.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=5)

    argv = ["generate", "--workdir", workdir, "--max-new-tokens", "12"]
    assert cli.main([*argv, "--prompt", prompts[0]]) == 0
    assert capsys.readouterr().out == prompts[0] + texts[0] + "\n"
    assert (
        cli.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1], "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["completion"] for c in result["completions"]] == texts
    assert cli.main([*argv, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p=0.0" in capsys.readouterr().err


def test_bert_mlm_trains(data_dir, tmp_path):
    config = load_config(
        "configs/bert_mlm.py:tiny",
        tiny_overrides(
            data_dir,
            **{
                "train.steps": 24,
                "data.batch_size": 16,
                "optimizer.learning_rate": 3e-3,
            },
        ),
    )
    summary = train(config, str(tmp_path))
    evals = [r for r in read_metrics(str(tmp_path)) if r["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    model = fmjax.load(str(tmp_path))
    assert model.embed(["one sentence"]).shape == (1, 64)
    assert summary["eval"]["accuracy"] > evals[0]["accuracy"]

    # The life cycle goes on: this pre-trained encoder (its MLM head dropped) is
    # the base of a LoRA sentiment classifier.
    clf_dir = str(tmp_path / "classifier")
    overrides = {
        "init.model": str(tmp_path),
        "data.data_dir": str(data_dir),
        "data.seq_len": 32,
        "data.batch_size": 8,
        "data.train_examples": 64,
        "data.test_split": "",
        "train.steps": 2,
        "train.eval_batches": 2,
        "train.progress": False,
        "mesh.num_devices": 1,
    }
    clf = load_config(
        "configs/classify.py:lora", [f"{k}={v}" for k, v in overrides.items()]
    )
    clf_summary = train(clf, clf_dir)
    assert clf_summary["params"]["trainable_percent"] < 5
    out = fmjax.load(clf_dir).classify(["a fine film", "a dull film"])
    assert [o["label"] in ("rotten", "fresh") for o in out] == [True, True]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_continued_pretraining_with_an_adapter(gpt_run, data_dir, tmp_path, method):
    """The pre-trained tiny GPT, adapted to a second corpus (Rotten Tomatoes) by
    next-token training of LoRA / QLoRA adapters: held-out loss on that corpus
    falls, the base is untouched, checkpoints and the export hold the adapter
    only, and fmjax.load gives the adapted decoder."""
    from fmjax.models.text import TextDecoder

    base_dir = gpt_run[0]
    base_before = _params(base_dir)
    workdir = str(tmp_path / method)
    overrides = {
        "init.model": base_dir,
        "data.name": "rotten_tomatoes",
        "adapt.method": method,
        "adapt.lora_targets": "all-linear",
        "adapt.lora_dropout": 0.0,
        "optimizer.learning_rate": 1e-2,
        "train.steps": 32,
        "train.eval_every": 16,
        "checkpoint.every": 16,
    }
    summary = train(
        load_config("configs/gpt_lm.py:tiny", tiny_overrides(data_dir, **overrides)),
        workdir,
    )
    evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
    # A 12-step base has few features for adapters to steer: the fall is small
    # (0.02-0.03 here) but real, on the same fixed held-out batches.
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.01, evals
    assert summary["params"]["trainable_percent"] < 25
    for key, value in _params(base_dir).items():
        np.testing.assert_array_equal(value, base_before[key])

    export = os.path.join(workdir, "export")
    assert not os.path.exists(os.path.join(export, "model.safetensors"))
    adapter = load_file(os.path.join(export, "adapter.safetensors"))
    assert adapter and all(k.startswith(f"{method}.") for k in adapter), list(adapter)
    # The checkpoint's arrays: step, rng, the adapters and their optimizer state.
    with open(os.path.join(workdir, "checkpoints", "32", "state", "_METADATA")) as f:
        saved = [eval(k) for k in json.load(f)["tree_metadata"]]  # tuple reprs
    params = [k for k in saved if k[0] == "params" and k != ("params", "model")]
    assert params and all(k[1] == method for k in params), params  # no head here
    assert not [k for k in saved if k[0] == "frozen"]
    base_leaves = ("kernel", "bias", "embedding", "scale")  # no base param, no moment
    assert not [k for k in saved if k[-1] in base_leaves]

    model = fmjax.load(workdir)
    assert isinstance(model.module, TextDecoder)
    ids = model.encode_batch(["a gripping, funny film"])
    adapted = model.logits(ids)
    base = fmjax.load(base_dir).logits(ids)
    assert adapted.shape == base.shape and np.isfinite(adapted).all()
    assert np.abs(adapted - base).max() > 1e-3  # the adapter is applied
    # `fmjax eval` rebuilds the base from init.model and restores the adapter.
    result = fmjax.train.loop.evaluate_workdir(load_config_json(workdir), workdir)
    assert result["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)


def load_config_json(workdir):
    from fmjax.config import from_json

    with open(os.path.join(workdir, "config.json")) as f:
        return from_json(f.read())


def _fmjax(workdir, data_dir, *extra, wait=True):
    cmd = [sys.executable, "-m", "fmjax.cli", "train"]
    cmd += ["--config", "configs/gpt_lm.py:tiny", "--workdir", str(workdir)]
    cmd += tiny_overrides(data_dir, **{"checkpoint.async_save": False}) + list(extra)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
    path = os.path.join(workdir, "checkpoints", str(step))
    start = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "no checkpoint appeared"
        time.sleep(0.05)


def test_sigkill_resume_is_bit_identical(gpt_run, data_dir, tmp_path):
    reference, _, reference_curve = gpt_run
    workdir = tmp_path / "killed"
    proc = _fmjax(workdir, data_dir, wait=False)
    _wait_for_checkpoint(str(workdir), 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(workdir / "summary.json")
    code, out, err = _fmjax(workdir, data_dir)
    assert code == 0, err
    assert "resumed from step" in out
    expected, got = _params(reference), _params(str(workdir))
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
    assert _curve(str(workdir)) == reference_curve


def test_sigterm_saves_then_resume_matches(gpt_run, data_dir, tmp_path):
    reference, _, reference_curve = gpt_run
    workdir = tmp_path / "preempted"
    # Checkpoints only at the end: the one SIGTERM writes is the only way to resume.
    proc = _fmjax(workdir, data_dir, "--config.checkpoint.every=1000", wait=False)
    start = time.time()
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: saved a checkpoint at step" in out
    saved = int(out.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
    assert 2 <= saved < 12
    assert os.path.isdir(workdir / "checkpoints" / str(saved))
    code, out, err = _fmjax(workdir, data_dir, "--config.checkpoint.every=1000")
    assert code == 0, err
    assert f"resumed from step {saved}" in out
    expected, got = _params(reference), _params(str(workdir))
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
    assert _curve(str(workdir)) == reference_curve


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, capsys):
    workdir = str(tmp_path)
    args = ["train", "--config", "configs/gpt_lm.py:tiny", "--workdir", workdir]
    args += tiny_overrides(
        data_dir,
        **{
            "optimizer.learning_rate": 1e35,
            "optimizer.grad_clip_norm": 0.0,
            "checkpoint.every": 1,
            "train.log_every": 1,
            "train.eval_every": 0,
        },
    )
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and "last good checkpoint is step" in err, err
    records = read_metrics(workdir)
    bad_step = int(err.split("and ")[1].split(";")[0])
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")))
    assert saved and max(saved) < bad_step
    assert all(np.isfinite(r["loss"]) for r in records if isinstance(r["loss"], float))
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_data_prepare_and_embed_commands(gpt_run, data_dir, tmp_path, capsys):
    workdir, _, _ = gpt_run
    args = ["data", "prepare", "bbc_news", "--data-dir", str(data_dir)]
    assert cli.main([*args, "--vocab-size", "1000"]) == 0
    out = capsys.readouterr().out
    assert "prepared bbc_news" in out and "(1000 tokens)" in out
    lines = tmp_path / "lines.txt"
    lines.write_text("Shares fell.\n\nThe striker scored.\nProfits rose.\n")
    output = tmp_path / "emb.npy"
    args = [
        "embed",
        "--workdir",
        workdir,
        "--input",
        str(lines),
        "--output",
        str(output),
    ]
    assert cli.main(args) == 0
    embeddings = np.load(output)
    assert embeddings.shape == (3, 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(
        embeddings,
        fmjax.load(workdir).embed(
            ["Shares fell.", "The striker scored.", "Profits rose."]
        ),
        rtol=1e-6,
    )


def test_sharding_rule_errors_fail_at_startup(data_dir, tmp_path, capsys):
    # 2 heads cannot be split 4 ways: the message names the param and shapes.
    args = ["train", "--config", "configs/gpt_lm.py:tiny", "--workdir", str(tmp_path)]
    args += tiny_overrides(data_dir, **{"mesh.data": 2, "mesh.tensor": 4})
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "layers_0/attention/" in err and "of shape (2, " in err, err
    assert "not divisible by mesh axes ('tensor',)" in err, err
    assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_a_prompt_completion_file_trains_on_the_completions(data_dir, tmp_path):
    """`data.name=jsonl:FILE` of prompt/completion rows: the tokenizer is
    trained on the file, the loss counts each completion's tokens and its eos
    (eval count = their number over the validation rows), and the run's sample
    answers the first validation prompt."""
    from fmjax.data.tokenizer import load_tokenizer

    rows = [
        {
            "prompt": f"Q: {a} plus {a + 3} is?\nA:",
            "completion": f" {2 * a + 3}",
            "split": "train" if a < 48 else "validation",
        }
        for a in range(60)
    ]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_overrides(
        data_dir,
        **{
            "data.name": f"jsonl:{path}",
            "data.vocab_size": 300,
            "model.vocab_size": 300,
            "data.seq_len": 32,
            "train.steps": 2,
            "train.eval_batches": 100,
        },
    )
    workdir = str(tmp_path / "run")
    summary = train(load_config("configs/gpt_lm.py:tiny", overrides), workdir)
    tok = load_tokenizer(workdir)
    held_out = [r for r in rows if r["split"] == "validation"]
    want = sum(len(tok.encode(r["completion"])) + 1 for r in held_out)
    assert summary["eval"]["count"] == want
    assert summary["sample"]["prompt"] == held_out[0]["prompt"]
