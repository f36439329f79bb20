"""Every `fmjax ...` command the README shows runs as written, in README order,
with tiny-size overrides appended (so a documented command cannot break again).
One test file per README part, so the test workers share them out; the runner
is `conftest.run_readme_commands`.

Placeholders a reader replaces are the only substitutions: `/path/to/hf_bert`
(a tiny random HF BERT directory), `my.csv`, `my_sft.jsonl`, `sentences.txt`,
`prompts.txt` (small files made here), the repo's `tasks/` folder (an absolute path: the
commands run elsewhere) and the coordinator port (a free one); `fmjax data
prepare` builds the tokenizer the session's data dir already has (1,000 tokens,
not 8,000). Workdirs (`runs/...`) live in a temporary directory.
"""

import json
import shlex

from conftest import readme_commands, run_readme_commands

PARTS = {
    "quick start and training": (
        "Quick start",
        "Training",
        "Generation",
        "Prompting and evaluation",
    ),
    "vision": ("Vision",),
    "image-text": ("Image-text",),
    "scale": ("Sharded and multi-host training",),
    "adapters": ("Pretrained models and adapters",),
}


def test_readme_shows_the_commands_users_run():
    commands = readme_commands()
    subcommands = {shlex.split(c.split("fmjax ", 1)[1])[0] for c in commands}
    assert {
        "train",
        "eval",
        "data",
        "embed",
        "convert",
        "compile",
        "bench",
        "generate",
        "search",
    } <= (  # fmt: skip
        subcommands
    )
    # Every command belongs to one of the parts the tests run.
    parts = [c for sections in PARTS.values() for c in readme_commands(sections)]
    assert sorted(parts) == sorted(commands)


def test_quick_start_and_training_commands_run(
    tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
    sections = PARTS["quick start and training"]
    run_readme_commands(sections, tiny_bert_dir, data_dir, tmp_path, monkeypatch)
    adapter = tmp_path / "runs" / "rt_gpt_lora" / "export" / "adapter.safetensors"
    assert adapter.exists()
    assert (tmp_path / "emb.npy").exists()
    assert (tmp_path / "runs" / "quickstart" / "summary.json").exists()
    sft = json.loads((tmp_path / "runs" / "sft" / "summary.json").read_text())
    assert sft["sample"]["prompt"].startswith("Q: ")  # a held-out prompt answered
    lm_eval = tmp_path / "runs" / "quickstart" / "lm_eval"
    assert (lm_eval / "results.json").exists()
    assert (lm_eval / "accuracy_vs_shots.png").exists()
    index = tmp_path / "runs" / "bbc_index"
    assert {p.name for p in index.iterdir()} == {
        "embeddings.safetensors",
        "passages.jsonl",
        "index.json",
    }
