"""The README's vision commands run as written (see tests/test_readme.py), on
a 480-image slice of Fashion-MNIST and a 2-layer ViT."""

import json

from conftest import run_readme_commands
from test_readme import PARTS

from fmjax.export import load_export_config


def test_vision_commands_run(
    tiny_bert_dir, tiny_vit_dir, data_dir, fashion_dir, tmp_path, monkeypatch
):
    sections = PARTS["vision"]
    run_readme_commands(
        sections, tiny_bert_dir, data_dir, tmp_path, monkeypatch, tiny_vit_dir
    )
    for run in ("fmnist_vit", "fmnist_mae", "fmnist_simclr", "fmnist_dino", "my_vit"):
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["steps"] == 4, run
        if run not in ("fmnist_simclr", "fmnist_dino"):  # evaluated in test_ssl
            assert "knn_accuracy" in summary["features"], run
    # The image folder's two class folders became the classifier's classes.
    config = load_export_config(str(tmp_path / "runs" / "my_vit"))
    assert config["model"]["num_classes"] == 2
    # The HF conversions: a ViT in, the MAE run out as ViTMAEForPreTraining.
    assert (tmp_path / "runs" / "vit_from_hf" / "model.safetensors").exists()
    hf_config = json.loads((tmp_path / "runs/fmnist_mae_hf/config.json").read_text())
    assert hf_config["architectures"] == ["ViTMAEForPreTraining"]
