"""Every `fmjax ...` command the README shows runs as written, in README order,
with tiny-size overrides appended (so a documented command cannot break again).

Placeholders a reader replaces are the only substitutions: `/path/to/hf_bert`
(a tiny random HF BERT directory), `my.csv`, `sentences.txt` (small files made
here) and the coordinator port (a free one). Workdirs (`runs/...`) live in a
temporary directory.
"""

import os
import re
import shlex
import socket
import subprocess
import sys

import conftest
from conftest import REPO

from fmjax import cli

# Appended to each subcommand: small models, few steps, the session's data dir.
TRAIN = {
    "train.steps": 4,
    "train.log_every": 2,
    "train.eval_every": 0,
    "train.eval_batches": 2,
    "checkpoint.every": 4,
}
CLASSIFY = {
    "data.seq_len": 32,
    "data.batch_size": 8,
    "data.train_examples": 64,
    "train.progress": False,
    "mesh.num_devices": 1,
    **TRAIN,
}


def readme_commands() -> list[str]:
    """The README's `fmjax` command lines (continuations joined), in order."""
    text = open(os.path.join(REPO, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            line = line.split("&& ")[-1]  # the Quick start chains its installs
            words = shlex.split(line, comments=True) if line else []
            env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
            if words[len(env) : len(env) + 1] == ["fmjax"]:
                commands.append(line)
    return commands


def _overrides(argv: list[str], tiny_bert_dir, data_dir) -> list[str]:
    command = argv[0]
    config = argv[argv.index("--config") + 1] if "--config" in argv else ""
    if command == "train" and "classify.py" in config:
        values = {"init.model": tiny_bert_dir, "data.data_dir": data_dir, **CLASSIFY}
    elif command == "train":
        values = {**conftest.TINY, "data.data_dir": data_dir, **TRAIN}
        if any("init.model" in a for a in argv):
            values = {"data.data_dir": data_dir, "train.progress": False, **TRAIN}
    elif command == "eval":
        values = {"train.eval_batches": 2}
    elif command == "compile" or argv[:2] == ["bench", "memory"]:
        model = {k: v for k, v in conftest.TINY.items() if k.startswith("model.")}
        values = {**model, "data.seq_len": 64}
        if command == "bench" and "--methods" not in argv:
            values["data.batch_size"] = 8
    else:
        return []
    return [f"--config.{k}={v}" for k, v in values.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_shows_the_commands_users_run():
    commands = readme_commands()
    subcommands = {shlex.split(c.split("fmjax ", 1)[1])[0] for c in commands}
    assert {"train", "eval", "data", "embed", "convert", "compile", "bench"} <= (
        subcommands
    )


def test_every_readme_command_runs(tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentences.txt").write_text("The market rallied.\nA quiet day.\n")
    rows = ["text,label"] + [
        f"{'a fine film' if i % 2 else 'a dull film'} number {i},"
        f"{'good' if i % 2 else 'bad'}"
        for i in range(80)
    ]
    (tmp_path / "my.csv").write_text("\n".join(rows) + "\n")
    port = str(_free_port())
    background = []
    for line in readme_commands():
        line = line.replace("/path/to/hf_bert", str(tiny_bert_dir))
        line = line.replace("127.0.0.1:1234", f"127.0.0.1:{port}")
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
        words = words[len(env) :]
        in_background = words[-1] == "&"
        argv = [w for w in words[1:] if w != "&"]
        argv += _overrides(argv, str(tiny_bert_dir), str(data_dir))
        if "--coordinator" in argv:  # one of a run's processes: its own process
            command = [sys.executable, "-m", "fmjax.cli", *argv]
            process_env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
            )
            process_env.pop("FMJAX_HOST_DEVICES", None)
            proc = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=process_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            background.append((line, proc))
            if in_background:
                continue
            for shown, p in background:
                _, err = p.communicate(timeout=600)
                assert p.returncode == 0, f"{shown}\n{err[-3000:]}"
            background = []
            continue
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = cli.main(argv)
        assert code == 0, line
    assert not background
    assert (
        tmp_path / "runs" / "rt_gpt_lora" / "export" / "adapter.safetensors"
    ).exists()
    assert (tmp_path / "runs" / "my_lora" / "summary.json").exists()
    assert (tmp_path / "emb.npy").exists()
    assert (tmp_path / "runs" / "two" / "summary.json").exists()
