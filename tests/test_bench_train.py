"""`fmjax bench train --against hf` for the text models: fmjax and HF take
turns within every round, each side reports the median of its rounds, and
the JSON records the CPU, the thread count and the library versions."""

import json
import statistics

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fmjax import bench, bench_rounds, cli  # noqa: E402


def test_alternate_rounds_interleaves_the_sides():
    calls = []
    steppers = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench_rounds.alternate_rounds(steppers, warmup=2, steps=2, rounds=3)
    # each turn: one untimed step, then two timed ones
    rounds = ["a", "a", "a", "b", "b", "b"], ["b", "b", "b", "a", "a", "a"]
    # warm-up step by step, one untimed round, three timed ones
    assert calls == ["a", "b"] * 2 + rounds[1] + rounds[0] + rounds[1] + rounds[0]
    assert [len(t) for t in times.values()] == [3, 3]
    assert all(s >= 0 for t in times.values() for s in t)


def test_matmul_peak_is_the_best_repeat(monkeypatch):
    """The peak is one product's FLOPs over the fastest repeat, not an average."""
    ticks = iter([0.0, 1.0, 1.0, 1.5, 1.5, 3.5] * 2)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    peaks = bench.matmul_peak_flops(size=64, repeats=3)
    assert peaks["xla"] == pytest.approx(2 * 64**3 / 0.5)


def test_hf_side_runs_where_jax_computes(monkeypatch):
    """On JAX's CPU backend HF runs on the CPU; a TPU, or a GPU that this
    PyTorch cannot use (the CPU wheel), is refused by name rather than timed
    on the CPU, and the matmul peak then times XLA alone."""
    import jax
    import torch

    from fmjax import bench_torch

    assert bench_torch.hf_device() == "cpu"
    with monkeypatch.context() as patched:
        patched.setattr(jax, "default_backend", lambda: "tpu")
        with pytest.raises(bench.ConfigError, match="JAX computes on 'tpu'"):
            bench_torch.hf_device()
        assert set(bench.matmul_peak_flops(size=32, repeats=1)) == {"xla"}
    assert bench_torch.torch_setup(torch.get_num_threads(), "cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(bench.ConfigError, match="sees no CUDA device"):
            bench_torch.torch_setup(torch.get_num_threads(), "cuda")


@pytest.mark.parametrize("config", ["gpt_lm", "bert_mlm"])
def test_bench_train_against_hf_json(config, monkeypatch, capsys):
    peak = bench.matmul_peak_flops
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda: peak(128, 2))
    rounds = 3
    argv = ["bench", "train", "--config", f"configs/{config}.py:tiny", "--json"]
    argv += ["--against", "hf", "--warmup", "1", "--steps", "1"]
    argv += ["--rounds", str(rounds), "--config.data.batch_size=8"]
    assert cli.main(argv + ["--config.data.seq_len=32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rounds"] == rounds and result["seq_len"] == 32
    assert isinstance(result["cpu"], str) and result["cpu"]
    assert result["threads"] >= 1 and result["cpu_cores"] >= 1
    assert {"jax", "flax", "torch", "transformers"} <= set(result["versions"])
    flops = {"fmjax": result["fmjax_train_flops_per_token"]}
    flops["hf"] = result["train_flops_per_token"]
    for side in ("fmjax", "hf"):
        r = result[side]
        assert len(r["step_s_rounds"]) == rounds
        assert r["step_s"] == statistics.median(r["step_s_rounds"]) > 0
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s"])
        assert r["mfu"] == pytest.approx(
            r["tokens_per_s"] * flops[side] / result["peak_flops"]
        )
    assert result["hf"]["transformers"] == result["versions"]["transformers"]
    assert result["speedup_vs_hf"] == pytest.approx(
        result["fmjax"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    )
    # the bound: HF's step over fmjax's step FLOPs at the peak
    assert result["speedup_bound_at_peak"] == pytest.approx(
        result["hf"]["step_s"] * result["peak_flops"] / (8 * 32 * flops["fmjax"])
    )
    if config == "bert_mlm":  # fmjax's MLM head scores only the masked positions
        assert flops["fmjax"] < flops["hf"]


def _logging_stepper(log: str, fail: bool):
    """A ChildStepper builder: run() appends a line to `log`; info is the
    builder's pid."""
    import os

    if fail:
        raise ValueError("no HF model for this config")

    def run():
        with open(log, "a") as f:
            f.write("step\n")

    return run, os.getpid()


def test_child_stepper_steps_in_its_own_process(tmp_path):
    import os

    log = str(tmp_path / "steps.log")
    run, pid = bench_rounds.in_child(_logging_stepper, log, False)
    assert pid != os.getpid()
    for _ in range(3):
        run()  # waits for the child's step
    assert open(log).read() == "step\n" * 3
    with pytest.raises(RuntimeError, match="no HF model for this config"):
        bench_rounds.in_child(_logging_stepper, log, True)
