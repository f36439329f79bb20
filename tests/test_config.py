"""Config loading, overrides and the checks that run before any compute."""

import re
import time

import pytest

from fmjax import cli
from fmjax.config import ConfigError, load_config


@pytest.mark.parametrize(
    "name, variant",
    [(n, v) for n in ("bert_mlm", "gpt_lm") for v in ("tiny", "small", "base")]
    + [("gpt_lm", "1b"), ("gpt_lm", "8b")],
)
def test_variants_load_and_validate(name, variant):
    from fmjax.tasks import task_for

    config = load_config(f"configs/{name}.py:{variant}")
    task = task_for(config, with_data=False)  # validates; reads no data
    assert config.model.kind == {"bert_mlm": "encoder", "gpt_lm": "decoder"}[name]
    assert task.model_config.kind == config.model.kind


@pytest.mark.parametrize("name", ["bert_mlm", "gpt_lm", "classify"])
def test_every_config_file_has_a_default_variant(name):
    config = load_config(f"configs/{name}.py")
    assert config.config_spec.startswith(f"configs/{name}.py:")
    variant = config.config_spec.split(":")[1]
    assert load_config(config.config_spec).to_dict() == config.to_dict(), variant


def test_init_from_is_an_alias_of_init_model():
    config = load_config("configs/gpt_lm.py:tiny", ["--config.init.from=/some/run"])
    assert config.init.model == "/some/run"


def test_task_config_is_resolved_without_touching_the_input():
    from fmjax.tasks import TASKS, task_for

    config = load_config("configs/gpt_lm.py:tiny")
    before = config.to_dict()
    task = task_for(config, with_data=False)
    assert config.to_dict() == before
    assert task.config is not config
    assert set(TASKS) >= {"mlm", "causal", "classify"}
    with pytest.raises(ConfigError, match="objective.name='nope'"):
        task_for(load_config("configs/gpt_lm.py:tiny", ["objective.name=nope"]))


def test_overrides_are_typed():
    config = load_config(
        "configs/gpt_lm.py:tiny",
        [
            "--config.train.steps=7",
            "optimizer.learning_rate=3e-4",
            "train.progress=false",
        ],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optimizer.learning_rate == 3e-4
    assert config.train.progress is False


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.train.stepz=5",
            "unknown config key 'train.stepz'; did you mean train.steps",
        ),
        ("--config.train.steps=many", "--config.train.steps='many': expected an int"),
        ("--config.modle.d_model=3", "unknown config key 'modle'"),
        ("--config.train=3", "is a group"),
        ("--config.train.progress=maybe", "expected a bool"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/gpt_lm.py:tiny", [override])


def test_unknown_variant():
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        load_config("configs/gpt_lm.py:huge")


def _cli_error(capsys, *args):
    start = time.time()
    code = cli.main(["train", "--workdir", "/tmp/fmjax_never_used", *args])
    err = capsys.readouterr().err
    assert time.time() - start < 30, "a config error must fail before any compute"
    assert code == 2
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.stepz=1"], "unknown config key 'train.stepz'"),
        (["--config.data.batch_size=abc"], "expected an int"),
        (
            ["--config.data.vocab_size=9000", "--config.model.vocab_size=4000"],
            "vocabulary/model size mismatch: data.vocab_size=9000",
        ),
        (["--config.data.seq_len=1024"], "data.seq_len=1024 is longer than"),
        (["--config.model.kind=encoder"], "model.kind='encoder' cannot train"),
        (["--config.model.num_heads=0"], "num_heads"),
        (["--config.mesh.tensor=3"], "mesh"),
    ],
)
def test_cli_config_errors_are_one_message(capsys, args, message):
    err = _cli_error(capsys, "--config", "configs/gpt_lm.py:tiny", *args)
    assert message in err, err


def test_cli_missing_dataset(capsys, tmp_path):
    err = _cli_error(
        capsys,
        "--config",
        "configs/gpt_lm.py:tiny",
        "--config.data.name=no_such_corpus",
        f"--config.data.data_dir={tmp_path}",
    )
    assert "no_such_corpus" in err and "fmjax data prepare" in err, err


def test_ci_runs_the_readme_quick_start_test_command():
    from conftest import REPO

    readme = open(f"{REPO}/README.md").read()
    block = readme.split("## Quick start")[1].split("```bash")[1].split("```")[0]
    main_job, generate, tests = [line for line in block.strip().splitlines() if line]
    assert "fmjax train" in main_job and "pytest" in tests
    assert generate.startswith("fmjax generate --workdir runs/quickstart --prompt")
    assert tests in open(f"{REPO}/.ci/run").read().splitlines()
