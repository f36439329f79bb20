"""`fmjax bench decode`: greedy generation speed of fmjax (prefill, decode,
time to first token, compile), and of HF `generate` on the same weights,
measured in one run."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fmjax.bench import cpu_model, library_versions, matmul_peak_flops
from fmjax.bench_torch import hf_device, synchronize, torch_setup
from fmjax.config import ConfigError
from fmjax.models import build_model
from fmjax.tasks import task_for


def _median(values) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def bench_decode(
    config,
    against: str = "",
    batch_sizes=(1, 8),
    prompt_len: int = 128,
    new_tokens: int = 128,
    repeats: int = 5,
) -> dict:
    """`fmjax bench decode`: greedy generation from a random decoder of the
    config's shape, prompt `prompt_len` tokens, `new_tokens` new ones (no EOS
    ends a row early on either side), float32. Reports prefill tokens/s, decode
    tokens/s, time to first token and compile time separately, per batch size,
    as medians of `repeats` runs; with against="hf" also HF `generate` (KV
    cache) on the same weights, its runs interleaved with fmjax's so both see
    the same machine state. Each decode step's time is set against two
    floors measured in the same run: the time its FLOPs take at this
    machine's matmul peak, and the time its bytes (every weight once, the
    keys and values of the mean context's slots) take to stream through
    matrix-vector products (`stream_seconds`); decoding is bound by the
    larger, and `speedup_bound` is the other side's step over it. Compile
    times are XLA's own: the persistent compilation cache the `fmjax` command
    turns on (`fmjax.cli.compilation_cache_environ`) is off here."""

    jax.config.update("jax_enable_compilation_cache", False)
    m = config.model
    if m.kind != "decoder" or m.dtype != "float32":
        raise ConfigError(
            f"bench decode needs a float32 decoder; got model.kind={m.kind!r}, "
            f"model.dtype={m.dtype!r}"
        )
    if against not in ("", "hf"):
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    threads = int(os.environ.get("FMJAX_BENCH_THREADS", os.cpu_count() or 1))
    task = task_for(config, with_data=False)
    cfg = task.model_config
    if prompt_len + new_tokens > cfg.max_len:
        raise ConfigError(
            f"prompt {prompt_len} + {new_tokens} new tokens > model.max_len="
            f"{cfg.max_len}"
        )
    generator = random_generator(cfg)
    params = generator.params
    hf_model = None
    if against == "hf":
        hf_model = _hf_decoder(cfg, params, threads, hf_device())
    peaks = matmul_peak_flops(repeats=30)
    peak = max(peaks.values())
    rows = []
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        prompts = rng.integers(5, cfg.vocab_size, size=(batch, prompt_len))
        row = {"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
        ours, theirs = [], []
        first = _time_fmjax_generate(generator, prompts, new_tokens)  # compiles
        for _ in range(repeats):
            ours.append(_time_fmjax_generate(generator, prompts, new_tokens))
            if hf_model is not None:
                theirs.append(_time_hf_generate(hf_model, prompts, new_tokens))
        row["fmjax"] = _decode_stats(ours, batch, prompt_len, new_tokens)
        # The first call's extra time over a compiled call: prefill + decode loop.
        row["fmjax_compile_s"] = first["total_s"] - _median(
            [r["total_s"] for r in ours]
        )
        step_s = row["fmjax"]["decode_step_s"]
        context = prompt_len + new_tokens // 2  # a step's mean context
        flops = batch * decode_flops_per_token(cfg, context)
        row["decode_step_flops"] = flops
        row["decode_step_at_peak_s"] = flops / peak
        row["decode_step_bytes"] = decode_step_bytes(cfg, batch, context)
        row["decode_step_at_bandwidth_s"] = stream_seconds(
            step_arrays(cfg, params, batch, context)
        )
        floor = max(row["decode_step_at_peak_s"], row["decode_step_at_bandwidth_s"])
        row["fmjax"]["fraction_of_peak"] = flops / peak / step_s
        row["fmjax"]["fraction_of_bandwidth"] = (
            row["decode_step_at_bandwidth_s"] / step_s
        )
        if hf_model is not None:
            row["hf"] = _decode_stats(theirs, batch, prompt_len, new_tokens)
            hf_step_s = row["hf"]["decode_step_s"]
            row["hf"]["fraction_of_peak"] = flops / peak / hf_step_s
            row["hf"]["fraction_of_bandwidth"] = (
                row["decode_step_at_bandwidth_s"] / hf_step_s
            )
            row["speedup_bound"] = hf_step_s / floor
            row["decode_speedup_vs_hf"] = (
                row["fmjax"]["decode_tokens_per_s"] / row["hf"]["decode_tokens_per_s"]
            )
            row["ttft_ratio_to_hf"] = (
                row["fmjax"]["time_to_first_token_s"]
                / row["hf"]["time_to_first_token_s"]
            )
            outputs_equal = _same_greedy_tokens(generator, hf_model, prompts[:1], 16)
            row["first_16_greedy_tokens_equal_hf"] = outputs_equal
        rows.append(row)
    result = {
        "benchmark": "decode",
        "config": config.get("config_spec", config.name),
        "dtype": "float32",
        "threads": threads,
        "repeats": repeats,
        "cpu": cpu_model(),
        "devices": [str(d) for d in jax.devices()],
        "versions": library_versions(),
        "peak_flops": peak,
        "peak_flops_by_library": peaks,
        "rows": rows,
    }
    return result


def decode_flops_per_token(cfg, context: int) -> float:
    """Forward FLOPs of one decoded token: 2 per weight (embedding lookup aside)
    plus attention's scores and weighted values over `context` keys."""
    return 2.0 * decode_weights(cfg) + attention_flops_per_key(cfg) * context


def decode_step_bytes(cfg, batch: int, context: int) -> int:
    """Bytes a decode step must read, float32: every matmul weight once (the
    blocks and the output head; the embedding rows and norms are a few KB) and
    each row's keys and values at `context` slots."""
    cache = batch * context * 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim
    return 4 * (decode_weights(cfg) + cache)


def decode_weights(cfg) -> int:
    """Matmul weights one decoded token passes through: the blocks' and the
    output head's."""
    return block_weights(cfg) + cfg.d_model * cfg.vocab_size


def step_arrays(cfg, params, batch: int, context: int) -> list:
    """Arrays of the bytes `decode_step_bytes` counts: the model's own kernels
    (blocks, and the output head: the tied table as the [D, V] copy decoding
    reads) and keys and values of the cache's shape at `context` slots."""
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) == "kernel"
    ]
    if cfg.tie_embeddings:
        kernels.append(np.ones((cfg.d_model, cfg.vocab_size), np.float32))
    cache = np.ones((batch * cfg.kv_heads, context, cfg.head_dim), np.float32)
    return kernels + [cache] * (2 * cfg.num_layers)


def stream_seconds(arrays, steps: int = 20, repeats: int = 15) -> float:
    """The least time, per step of a jitted loop, that XLA's matrix-vector
    products take to read `arrays` once each (each as [rows, last dim], the
    vector depending on the step so nothing is hoisted): what a decode step's
    weights and cache cost to read on this machine, in the pattern a decode
    loop reads them, with two FLOPs per number read and nothing else."""
    import jax.numpy as jnp

    mats = [jnp.asarray(a, jnp.float32).reshape(-1, a.shape[-1]) for a in arrays]

    def loop(mats):
        def step(i, x):
            sums = [(jnp.full((1, m.shape[0]), 1e-6) * x) @ m for m in mats]
            return x + sum(jnp.sum(s) for s in sums)

        return jax.lax.fori_loop(0, steps, step, jnp.ones((), jnp.float32))

    run = jax.jit(loop)
    run(mats).block_until_ready()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(mats).block_until_ready()
        seconds.append(time.perf_counter() - started)
    return min(seconds) / steps


def block_weights(cfg) -> int:
    """Matmul weights a token passes through in the blocks (q, k, v, out and
    the MLP of every layer; no embedding, no head)."""
    return cfg.num_layers * (
        cfg.d_model * cfg.head_dim * (cfg.num_heads * 2 + cfg.kv_heads * 2)
        + 2 * cfg.d_model * cfg.mlp_dim
    )


def attention_flops_per_key(cfg) -> int:
    """Attention's scores and weighted values for one query and one key, over
    every layer and head."""
    return 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim


def random_generator(cfg):
    """A `Generator` over a random decoder of model config `cfg` (seed 0),
    whose token ids never end a row (no EOS): every run is full length."""
    import types

    import flax.linen as nn

    from fmjax.inference import generate as gen

    module = build_model(cfg)
    tokens = np.zeros((1, 8), np.int32)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), tokens)["params"])
    ids = types.SimpleNamespace(pad_id=0, bos_id=2, eos_id=-1)
    return gen.Generator(module, params, ids, max_len=cfg.max_len)


def _time_fmjax_generate(generator, prompts, new_tokens: int) -> dict:
    """Prefill (to the first token on the host) and the decode loop, timed apart."""
    from fmjax.inference.sampling import Sampling

    stream = generator.stream_ids(
        prompts.tolist(), new_tokens, Sampling(), chunk=new_tokens
    )
    started = time.perf_counter()
    next(stream)  # the prefill and the first token, fetched to the host
    first = time.perf_counter()
    *_, tokens_BN = stream
    done = time.perf_counter()
    assert tokens_BN.shape == (len(prompts), new_tokens), tokens_BN.shape
    return {"prefill_s": first - started, "total_s": done - started}


def _time_hf_generate(model, prompts, new_tokens: int) -> dict:
    import torch

    inputs = torch.from_numpy(np.asarray(prompts)).long().to(model.device)
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(input_ids=inputs, use_cache=True).logits[:, -1]
        logits.argmax(-1).tolist()  # the first token, on the host
        first = time.perf_counter()
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        synchronize(model.device)
        done = time.perf_counter()
    assert out.shape == (len(prompts), prompts.shape[1] + new_tokens), out.shape
    # generate re-runs the prefill: its decode time is what follows one prefill.
    return {"prefill_s": first - started, "total_s": done - first}


def _decode_stats(runs, batch: int, prompt_len: int, new_tokens: int) -> dict:
    prefill = [r["prefill_s"] for r in runs]
    decode = [r["total_s"] - r["prefill_s"] for r in runs]
    prefill_s, decode_s = _median(prefill), _median(decode)
    return {
        "time_to_first_token_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_s": decode_s / (new_tokens - 1),
        "prefill_s_runs": prefill,
        "decode_s_runs": decode,
    }


def _same_greedy_tokens(generator, model, prompts, new_tokens: int) -> bool:
    import torch

    ours = generator.generate_ids(prompts.tolist(), new_tokens)[0]
    inputs = torch.from_numpy(np.asarray(prompts)).long().to(model.device)
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, prompts.shape[1] :].tolist() == ours


def _hf_decoder(cfg, params, threads: int, device: str = "cpu"):
    """HF GPT2LMHeadModel holding `params` (fmjax's GPT-2 conversion), on
    `device`."""
    from fmjax.convert import gpt2

    device = torch_setup(threads, device)
    return gpt2.to_torch_model(cfg.to_dict(), params).to(device).eval()
