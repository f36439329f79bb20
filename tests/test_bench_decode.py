"""`fmjax bench decode --against hf`: each decode step set against the two
floors measured in the same run, its FLOPs at the matmul peak and its bytes
streamed (every weight once, the filled cache slots)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fmjax import bench_decode, cli  # noqa: E402
from fmjax.config import load_config  # noqa: E402
from fmjax.models.config import TransformerConfig  # noqa: E402


@pytest.mark.parametrize("tied", [True, False])
def test_step_bytes_are_the_kernels_the_head_and_the_filled_cache(tied):
    import flax.linen as nn
    import jax

    from fmjax.models import build_model

    cfg = TransformerConfig(
        kind="decoder", vocab_size=50, d_model=16, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=32, max_len=64, position="rope",
        tie_embeddings=tied,
    )  # fmt: skip
    tokens = np.zeros((1, 4), np.int32)
    params = nn.unbox(build_model(cfg).init(jax.random.key(0), tokens)["params"])
    # per layer q and out 16x32, k and v 16x16, up and down 16x32; head 16x50;
    # keys and values: 3 rows x 2 kv heads x 10 slots x 8 per layer
    by_hand = 2 * (2 * 16 * 32 + 2 * 16 * 16 + 2 * 16 * 32) + 16 * 50
    by_hand += 2 * 2 * 3 * 2 * 10 * 8
    assert bench_decode.decode_step_bytes(cfg, 3, 10) == 4 * by_hand
    arrays = bench_decode.step_arrays(cfg, params, 3, 10)
    assert sum(np.asarray(a).nbytes for a in arrays) == 4 * by_hand
    assert bench_decode.stream_seconds(arrays, steps=2, repeats=2) > 0


def test_bench_decode_against_hf_json(monkeypatch, capsys):
    peak = bench_decode.matmul_peak_flops
    monkeypatch.setattr(bench_decode, "matmul_peak_flops", lambda repeats: peak(128, 2))
    argv = ["bench", "decode", "--config", "configs/gpt_lm.py:tiny", "--json"]
    argv += ["--against", "hf", "--batch-sizes", "1,2", "--prompt-len", "16"]
    assert cli.main(argv + ["--new-tokens", "8", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = load_config("configs/gpt_lm.py:tiny")
    cfg = bench_decode.task_for(config, with_data=False).model_config
    assert [row["batch_size"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        floor = max(row["decode_step_at_peak_s"], row["decode_step_at_bandwidth_s"])
        # the mean context of a step: the prompt and half the new tokens
        context = 16 + 8 // 2
        assert row["decode_step_bytes"] == bench_decode.decode_step_bytes(
            cfg, row["batch_size"], context
        )
        for side in ("fmjax", "hf"):
            step_s = row[side]["decode_step_s"]
            assert row[side]["fraction_of_bandwidth"] == pytest.approx(
                row["decode_step_at_bandwidth_s"] / step_s
            )
        assert row["speedup_bound"] == pytest.approx(row["hf"]["decode_step_s"] / floor)
        assert row["first_16_greedy_tokens_equal_hf"]
