"""The README's pretrained-model and adapter commands run as written (see
tests/test_readme.py)."""

from conftest import run_readme_commands
from test_readme import PARTS


def test_adapter_commands_run(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    run_readme_commands(
        PARTS["adapters"], tiny_bert_dir, data_dir, tmp_path, monkeypatch
    )
    assert (tmp_path / "runs" / "my_lora" / "summary.json").exists()
    assert (tmp_path / "runs" / "rt_lora_peft" / "adapter_config.json").exists()
