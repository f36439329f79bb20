"""The README's sharding, multi-process and TPU-planning commands run as written
(see tests/test_readme.py)."""

from conftest import run_readme_commands
from test_readme import PARTS


def test_scale_commands_run(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    run_readme_commands(PARTS["scale"], tiny_bert_dir, data_dir, tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "two" / "summary.json").exists()
    assert (tmp_path / "runs" / "fsdp" / "summary.json").exists()
