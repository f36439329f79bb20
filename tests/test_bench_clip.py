"""`fmjax bench train --against hf` for dual encoders (fmjax.bench_clip): the
HF CLIPModel it trains computes fmjax's loss on the same weights and batch,
its EOS is the token fmjax pools, and the CLI's JSON at tiny shapes holds
both sides' rounds, equal parameter counts, the CPU and library versions."""

import json
import statistics

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fmjax import bench, cli, objectives  # noqa: E402
from fmjax.bench_clip import hf_clip_model, random_pairs  # noqa: E402
from fmjax.config import ConfigError, load_config  # noqa: E402
from fmjax.convert import clip, hf  # noqa: E402
from fmjax.models import build_model  # noqa: E402
from fmjax.tasks import task_for  # noqa: E402

CONFIG = "configs/clip.py:tiny"
ROWS = 8  # a multiple of the tests' 8 devices


def _task(*overrides):
    return task_for(load_config(CONFIG, list(overrides)), with_data=False)


def test_hf_pools_the_token_fmjax_pools():
    """HF CLIP pools the first `eos_token_id`; fmjax the last real token."""
    task = _task()
    batch = random_pairs(task, 64)
    eos = hf_clip_model(task).config.text_config.eos_token_id
    first_eos_B = np.argmax(batch["tokens"] == eos, axis=1)
    last_real_B = batch["segment_ids"].sum(axis=1) - 1
    np.testing.assert_array_equal(first_eos_B, last_real_B)
    assert (batch["tokens"] == eos).sum() == 64  # one EOS per caption
    assert len(set(last_real_B)) > 1  # captions of several lengths


def test_hf_model_computes_the_clip_loss_of_fmjax():
    """On the same weights (HF's random ones, converted) and the benchmark's
    batch, HF's `return_loss=True` loss equals the clip task's InfoNCE and
    the towers' embeddings agree: gelu, causal mask, padding and pooling are
    fmjax's."""
    task = _task()
    model_dict = task.model_config.to_dict()
    batch = random_pairs(task, ROWS)
    torch.manual_seed(0)
    model = hf_clip_model(task).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # a temperature other than the initial one
        theirs = model(
            pixel_values=torch.from_numpy(batch["images"].transpose(0, 3, 1, 2)),
            input_ids=torch.from_numpy(batch["tokens"]).long(),
            attention_mask=torch.from_numpy(batch["segment_ids"]).long(),
            return_loss=True,
        )
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    shapes = hf._param_shapes(model_dict)
    num_in = {path: hf._num_in(model_dict, path) for path in shapes}
    flat = clip.params_from_hf(weights, shapes, model_dict, num_in)
    params = traverse_util.unflatten_dict(flat)
    args = (batch["images"], batch["tokens"], batch["segment_ids"])
    out = jax.jit(build_model(task.model_config).apply)({"params": params}, *args)
    sums = objectives.infonce_sums(
        out["image_embed"], out["text_embed"], out["logit_scale"], batch["weights"]
    )
    np.testing.assert_allclose(out["text_embed"], theirs.text_embeds, atol=2e-5)
    np.testing.assert_allclose(out["image_embed"], theirs.image_embeds, atol=2e-5)
    ours = float(sums["loss_sum"] / sums["count"])
    np.testing.assert_allclose(ours, float(theirs.loss), rtol=1e-5)


def test_hf_twin_refuses_what_clip_cannot_train():
    with pytest.raises(ConfigError, match="softmax"):
        hf_clip_model(_task("--config.objective.loss=sigmoid"))
    with pytest.raises(ConfigError, match="text_pool"):
        hf_clip_model(_task("--config.model.text_pool=mean"))


def test_bench_train_against_hf_json(monkeypatch, capsys):
    """Both sides time the same rounds; parameter counts equal (and equal
    fmjax's model); the run's machine and library versions are recorded."""
    peak = bench.matmul_peak_flops
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda: peak(256, 2))
    rounds = 2
    argv = ["bench", "train", "--config", CONFIG, "--against", "hf", "--json"]
    argv += ["--warmup", "1", "--steps", "1", "--rounds", str(rounds)]
    assert cli.main(argv + [f"--config.data.batch_size={ROWS}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    shapes = hf._param_shapes(_task().model_config.to_dict())
    model_params = sum(int(np.prod(shape)) for shape in shapes.values())
    assert result["params"] == {"fmjax": model_params, "hf": model_params}
    assert result["benchmark"] == "train" and result["batch_size"] == ROWS
    assert (result["image_size"], result["text_len"]) == (32, 16)
    assert result["dtype"] == "float32" and result["rounds"] == rounds
    assert isinstance(result["cpu"], str) and result["cpu"]
    assert {"jax", "flax", "torch", "transformers"} <= set(result["versions"])
    assert result["train_flops_per_step"] > 0 and result["peak_flops"] > 0
    for side in ("fmjax", "hf"):
        r = result[side]
        assert len(r["step_s_rounds"]) == rounds
        assert r["step_s"] == statistics.median(r["step_s_rounds"]) > 0
        assert r["pairs_per_s"] == pytest.approx(ROWS / r["step_s"])
        assert r["mfu"] == pytest.approx(
            result["train_flops_per_step"] / r["step_s"] / result["peak_flops"]
        )
    assert result["hf"]["transformers"] == result["versions"]["transformers"]
    assert result["hf"]["attn_implementation"]
    assert result["speedup_vs_hf"] == pytest.approx(
        result["fmjax"]["pairs_per_s"] / result["hf"]["pairs_per_s"]
    )
    assert result["speedup_bound_at_peak"] == pytest.approx(
        result["hf"]["step_s"] * result["peak_flops"] / result["train_flops_per_step"]
    )
