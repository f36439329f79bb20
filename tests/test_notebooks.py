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
