"""The notebooks run top to bottom (on a small budget)."""

import os
import re

import nbformat
import pytest
from conftest import REPO, tiny_overrides
from nbclient import NotebookClient


@pytest.fixture(scope="module")
def pretrained_notebook(data_dir, tmp_path_factory):
    """notebooks/01 run once: (its outputs, the workdir it trained)."""
    workdir = str(tmp_path_factory.mktemp("notebook") / "run")
    os.environ["FMJAX_NOTEBOOK_STEPS"] = "12"
    os.environ["FMJAX_NOTEBOOK_WORKDIR"] = workdir
    os.environ["FMJAX_NOTEBOOK_OVERRIDES"] = " ".join(tiny_overrides(data_dir))
    try:
        path = os.path.join(REPO, "notebooks", "01_pretrain_text.ipynb")
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb, timeout=300, resources={"metadata": {"path": REPO}}
        ).execute()
    finally:
        for name in ("STEPS", "WORKDIR", "OVERRIDES"):
            os.environ.pop(f"FMJAX_NOTEBOOK_{name}")
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    return outputs, workdir


def test_pretrain_notebook_runs(pretrained_notebook):
    outputs, _ = pretrained_notebook
    assert "The government said ->" in outputs


def test_sharding_notebook_runs_on_8_devices():
    path = os.path.join(REPO, "notebooks", "02_sharding.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "8 devices" in text
    assert "layers_0/mlp/up/kernel" in text and "P('fsdp', 'tensor')" in text


def test_lora_finetune_notebook_runs(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    """On the tiny random BERT (the notebook itself uses all-MiniLM-L6-v2)."""
    overrides = [
        f"init.model={tiny_bert_dir}",
        f"data.data_dir={data_dir}",
        "data.seq_len=32",
        "data.batch_size=8",
        "train.eval_batches=2",
        "data.test_split=",
        "train.progress=False",
    ]
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("FMJAX_NOTEBOOK_OVERRIDES", " ".join(overrides))
    path = os.path.join(REPO, "notebooks", "03_lora_finetune.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "trainable parameters: " in text and "adapter.safetensors" in text
    assert "adapter_model.safetensors" in text and "adapter_config.json" in text


def test_generate_notebook_runs(pretrained_notebook, monkeypatch):
    """On the decoder notebooks/01 trained (as 06 reuses the quick start's)."""
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", pretrained_notebook[1])
    path = os.path.join(REPO, "notebooks", "06_generate.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "The government said|" in text and "seed 1 ->" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)  # fmt: skip


def test_vision_ssl_notebook_runs(fashion_data, tmp_path, monkeypatch):
    """notebooks/04 on the Fashion-MNIST slice: MAE pre-training, probes of
    the frozen encoder against pixels, reconstructions."""
    overrides = [
        f"data.data_dir={fashion_data}",
        "mesh.num_devices=1",
        "features.train_examples=240",
        "features.shots=(1,)",
        "features.seeds=(0,)",
    ]
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "20")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("FMJAX_NOTEBOOK_OVERRIDES", " ".join(overrides))
    path = os.path.join(REPO, "notebooks", "04_vision_ssl.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "MAE encoder  10-shot ridge" in text and "raw pixels   10-shot" in text
    assert "reconstruction mean squared error" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(images) == 2  # the loss curve and the reconstructions


def test_clip_zero_shot_notebook_runs(emoji_dir, tmp_path, monkeypatch):
    """notebooks/05 on emoji_captions: a tiny CLIP for a few steps, zero-shot
    picks among held-out names, names -> pictures retrieval."""
    overrides = [
        f"data.data_dir={emoji_dir}",
        "mesh.num_devices=1",
        "retrieval.limit=32",
        "checkpoint.async_save=False",
    ]
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("FMJAX_NOTEBOOK_OVERRIDES", " ".join(overrides))
    path = os.path.join(REPO, "notebooks", "05_clip_zero_shot.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "1603 train emoji, 196 test emoji" in text
    assert "t2i_r@5: " in text and "(chance 0.15" in text  # 32 images: 5/32
    # Six pictures, each with its three best names of six, scores descending.
    picks = [line for line in text.splitlines() if " -> " in line]
    assert len(picks) == 6, picks
    for line in picks:
        scores = [float(s) for s in re.findall(r"\((0\.\d\d|1\.00)\)", line)]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True), line
    assert "among all 196 test names: top-1" in text
    ranks = [int(r) for r in re.findall(r"the right emoji ranks (\d+) of 196", text)]
    assert len(ranks) == 5 and all(1 <= r <= 196 for r in ranks), ranks
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(images) == 4  # pairs, loss curve, zero-shot picks, retrieval grid


def test_prompting_notebook_runs(pretrained_notebook, tiny_bert_dir, monkeypatch):
    """notebooks/07 on notebook 01's decoder and the tiny random BERT as its
    encoder, 4 documents per task."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", pretrained_notebook[1])
    monkeypatch.setenv("FMJAX_NOTEBOOK_ENCODER", str(tiny_bert_dir))
    monkeypatch.setenv("FMJAX_NOTEBOOK_LIMIT", "4")
    path = os.path.join(REPO, "notebooks", "07_prompting.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert re.search(r"rt_sentiment .*acc", text)  # the table over k
    assert "--- similar:" in text and "arithmetic_cot {'exact_match," in text
    assert "strict: 12 flexible: 12" in text
    assert "passages x 32 dims" in text and "--- prompt sent ---" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(images) == 1
