"""The notebooks run top to bottom (on a small budget)."""

import os

import nbformat
from conftest import REPO, tiny_overrides
from nbclient import NotebookClient


def test_pretrain_notebook_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("FMJAX_NOTEBOOK_OVERRIDES", " ".join(tiny_overrides(data_dir)))
    path = os.path.join(REPO, "notebooks", "01_pretrain_text.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
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


def test_generate_notebook_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("FMJAX_NOTEBOOK_OVERRIDES", " ".join(tiny_overrides(data_dir)))
    path = os.path.join(REPO, "notebooks", "06_generate.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": REPO}}).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "The government said|" in text and "seed 1 ->" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells
               if c.cell_type == "code" for o in c.outputs)  # fmt: skip
