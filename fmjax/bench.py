"""`fmjax bench train`: training throughput of fmjax, and of HF transformers on the
same shapes, batch, dtype and thread count, measured in one run.

Both sides run a full optimizer step (AdamW, global-norm clipping) on batches of
random token ids of the configured shape. MFU is achieved FLOP/s divided by this
machine's measured peak (the best of a large f32 matmul in XLA and in PyTorch).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fmjax import sharding as shd
from fmjax.config import ConfigError
from fmjax.models import build_model
from fmjax.objectives import max_predictions
from fmjax.tasks import task_for
from fmjax.tasks.text import TokenIds
from fmjax.train.state import make_optimizer
from fmjax.train.step import jit_train_step

# The ids of fmjax tokenizers (pad/unk/bos/eos/mask) that random batches avoid.
SPECIAL_IDS = TokenIds(0).special_ids
MASK_ID = TokenIds(0).mask_id


def train_flops_per_token(model_cfg, seq_len: int, head_fraction: float = 1.0) -> float:
    """6 N + 12 layers d L (PaLM's appendix B): N counts matmul weights, the output
    projection included and the embedding lookups excluded. `head_fraction` is the
    share of positions the output head scores (fmjax's MLM scores only the masked
    ones; HF's BertForMaskedLM scores all)."""
    d, f, layers = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.num_layers
    hk = model_cfg.num_heads * model_cfg.head_dim
    kv = (model_cfg.get("num_kv_heads") or model_cfg.num_heads) * model_cfg.head_dim
    per_layer = d * hk * 2 + d * kv * 2 + 2 * d * f
    head = d * model_cfg.vocab_size + (d * d if model_cfg.kind == "encoder" else 0)
    return 6 * (layers * per_layer + head * head_fraction) + 12 * layers * hk * seq_len


def _random_batch(rng, batch: int, seq_len: int, vocab: int) -> dict:
    tokens = rng.integers(
        len(SPECIAL_IDS), vocab, size=(batch, seq_len), dtype=np.int32
    )
    ones = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
    return {"tokens": tokens, "segment_ids": ones, "positions": positions.copy()}


def _time_steps(run_step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        run_step()
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    return (time.perf_counter() - start) / steps


def fmjax_train_step(config, batch: dict):
    """(run, compiled): `run()` does one full fmjax optimizer step of `config`'s
    task on `batch` (numpy, global) and waits for it; `compiled` is its XLA
    executable (for its cost analysis)."""
    from fmjax.train.run import init_state

    mesh = shd.mesh_from_config(config.mesh)
    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    tx, lr_fn = make_optimizer(10_000, **config.optimizer)
    _, shardings, init = init_state(task, model, tx, mesh, seed=0)
    loss_fn = task.loss_fn(model)
    with shd.activate(mesh, config.mesh.rules):
        step_fn = jit_train_step(
            loss_fn,
            lr_fn,
            config.optimizer.grad_accum_steps,
            shardings,
            mesh,
            task.update_extra,
            task.constrain_params,
        )
        holder = {"state": init()}
        global_batch = shd.global_batch(batch, mesh)
        compiled = step_fn.lower(holder["state"], global_batch).compile()

    def run():
        holder["state"], metrics = compiled(holder["state"], global_batch)
        jax.block_until_ready(metrics)

    return run, compiled


def bench_fmjax(config, warmup: int, steps: int) -> dict:
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    batch = _random_batch(
        np.random.default_rng(0), batch_size, seq_len, config.model.vocab_size
    )
    run, _ = fmjax_train_step(config, batch)
    seconds = _time_steps(run, warmup, steps)
    return {"step_s": seconds, "tokens_per_s": batch_size * seq_len / seconds}


def bench_hf(config, warmup: int, steps: int, threads: int) -> dict:
    """The same model shape in HF transformers (PyTorch), trained the same way."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = config.model
    if m.dtype != "float32":
        raise ConfigError(
            f"--against hf compares float32 only, got model.dtype={m.dtype}"
        )
    if m.kind == "decoder":
        hf_config = transformers.GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.max_len,
            n_embd=m.d_model,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.mlp_dim,
            activation_function="gelu_new",
            resid_pdrop=m.dropout_rate,
            embd_pdrop=m.dropout_rate,
            attn_pdrop=m.attention_dropout_rate,
            layer_norm_epsilon=m.layer_norm_eps,
        )
        model = transformers.GPT2LMHeadModel(hf_config)
    else:
        hf_config = transformers.BertConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.d_model,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            intermediate_size=m.mlp_dim,
            max_position_embeddings=m.max_len,
            hidden_dropout_prob=m.dropout_rate,
            attention_probs_dropout_prob=m.attention_dropout_rate,
            layer_norm_eps=m.layer_norm_eps,
        )
        model = transformers.BertForMaskedLM(hf_config)
    model.train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt.learning_rate,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(
        _random_batch(rng, batch_size, seq_len, m.vocab_size)["tokens"]
    ).long()
    if m.kind == "decoder":
        inputs, labels = tokens, tokens
    else:
        selected = torch.from_numpy(rng.random(tokens.shape) < 0.15)
        labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
        inputs = torch.where(selected, torch.full_like(tokens, MASK_ID), tokens)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()

    seconds = _time_steps(run, warmup, steps)
    return {
        "step_s": seconds,
        "tokens_per_s": batch_size * seq_len / seconds,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> dict:
    """Best sustained f32 matmul FLOP/s of XLA (and PyTorch, when installed)."""
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = {}
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    best["xla"] = 2 * size**3 * repeats / (time.perf_counter() - start)
    try:
        import torch

        t = torch.from_numpy(np.asarray(a))
        t @ t
        start = time.perf_counter()
        for _ in range(repeats):
            t @ t
        best["torch"] = 2 * size**3 * repeats / (time.perf_counter() - start)
    except ImportError:
        pass
    return best


def bench_train(config, against: str = "", warmup: int = 3, steps: int = 10) -> dict:
    threads = int(os.environ.get("FMJAX_BENCH_THREADS", os.cpu_count() or 1))
    if task_for(config, with_data=False).throughput_unit == "images":
        from fmjax.bench_vision import bench_train_images

        peaks = matmul_peak_flops()
        return {
            "benchmark": "train",
            "config": config.get("config_spec", config.name),
            "batch_size": config.data.batch_size,
            "dtype": config.model.dtype,
            "threads": threads,
            "devices": [str(d) for d in jax.devices()],
            "peak_flops": max(peaks.values()),
            "peak_flops_by_library": peaks,
            **bench_train_images(
                config, against, warmup, steps, threads, max(peaks.values())
            ),
        }
    seq_len = config.data.seq_len
    flops_per_token = train_flops_per_token(config.model, seq_len)
    fmjax_flops_per_token = flops_per_token
    if config.objective.name == "mlm":
        scored = max_predictions(seq_len, config.objective.get("mask_rate", 0.15))
        fmjax_flops_per_token = train_flops_per_token(
            config.model, seq_len, scored / seq_len
        )
    peaks = matmul_peak_flops()
    peak = max(peaks.values())
    result = {
        "benchmark": "train",
        "config": config.get("config_spec", config.name),
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "dtype": config.model.dtype,
        "threads": threads,
        "devices": [str(d) for d in jax.devices()],
        "peak_flops": peak,
        "peak_flops_by_library": peaks,
        "train_flops_per_token": flops_per_token,
        "fmjax_train_flops_per_token": fmjax_flops_per_token,
    }
    ours = bench_fmjax(config, warmup, steps)
    ours["mfu"] = ours["tokens_per_s"] * fmjax_flops_per_token / peak
    result["fmjax"] = ours
    if against == "hf":
        theirs = bench_hf(config, warmup, steps, threads)
        theirs["mfu"] = theirs["tokens_per_s"] * flops_per_token / peak
        result["hf"] = theirs
        result["speedup_vs_hf"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    elif against:
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    return result


def compiled_step_memory(config, mesh) -> dict:
    """Compiles the real sharded train step from abstract inputs (nothing is
    allocated) and returns its per-device memory analysis and FLOPs."""
    from fmjax.train.run import init_state

    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    tx, lr_fn = make_optimizer(10_000, **config.optimizer)
    abstract, shardings, _ = init_state(task, model, tx, mesh, seed=0)
    loss_fn = task.loss_fn(model)
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        shardings,
    )
    batch = task.abstract_batch(config.data.batch_size)
    batch_shardings = {
        k: shd.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()
    }
    batch_in = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in batch.items()
    }
    with shd.activate(mesh, config.mesh.rules):
        step_fn = jit_train_step(
            loss_fn,
            lr_fn,
            config.optimizer.grad_accum_steps,
            shardings,
            mesh,
            task.update_extra,
            task.constrain_params,
        )
        compiled = step_fn.lower(state_in, batch_in).compile()
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    state_bytes = shd.bytes_per_device(shardings, abstract)
    batch_bytes = shd.bytes_per_device(batch_shardings, batch_in)
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
        # The step's arguments are the state and the batch; the state part is what
        # fsdp shards.
        "state_bytes_compiled": int(analysis.argument_size_in_bytes) - batch_bytes,
        "state_bytes_from_shardings": int(state_bytes),
        "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
    ) - out["alias_bytes"]
    return out


def bench_memory(config, fsdp_sizes=(1, 2, 4, 8)) -> dict:
    """Per-device params + optimizer bytes for each fsdp size (data takes the rest
    of the devices): the target is <= 1.15 / N of the fsdp=1 figure."""
    devices = len(jax.devices())
    rows = []
    for fsdp in fsdp_sizes:
        if devices % fsdp:
            raise ConfigError(f"fsdp={fsdp} does not divide the {devices} devices")
        config.mesh.update(data=-1, fsdp=fsdp, tensor=1)
        mesh = shd.mesh_from_config(config.mesh)
        rows.append({"fsdp": fsdp, **compiled_step_memory(config, mesh)})
    base = rows[0]["state_bytes_compiled"]
    for row in rows:
        row["ratio_to_fsdp1"] = row["state_bytes_compiled"] / base
        row["target_ratio"] = 1.15 / row["fsdp"]
        row["meets_target"] = row["ratio_to_fsdp1"] <= row["target_ratio"]
    return {
        "benchmark": "memory",
        "config": config.get("config_spec", config.name),
        "devices": devices,
        "rows": rows,
    }


# Targets of `bench memory --methods`: QLoRA's total over LoRA's (f32 base) and
# over full fine-tuning's.
QLORA_TARGETS = {"lora": 0.3, "full": 0.1}


def bench_memory_methods(
    config, methods, batch_size: int, seq_len: int, topology: str = ""
) -> dict:
    """One device's memory for the real train step of each adaptation method,
    compiled from abstract inputs (nothing allocated) at `batch_size` x
    `seq_len`: argument bytes (params, frozen base, optimizer state, batch) and
    XLA's temporaries. `topology` (e.g. "v5p:1x1x1", one chip) compiles with the
    TPU compiler instead of this host's XLA:CPU, whose layout copies of frozen
    kernels inflate the temporaries of every method."""
    import copy

    devices = jax.devices()[:1]
    if topology:
        from fmjax.aot import parse_topology, topology_devices

        devices = topology_devices(*parse_topology(topology))[:1]
    rows = []
    for method in methods:
        c = copy.deepcopy(config)
        c.adapt.method = method
        c.data.update(batch_size=batch_size, seq_len=seq_len, num_shards=1)
        c.optimizer.grad_accum_steps = 1
        mesh = shd.make_mesh(1, 1, 1, devices=devices)
        rows.append({"method": method, **compiled_step_memory(c, mesh)})
    by_method = {row["method"]: row for row in rows}
    ratios = {}
    if "qlora" in by_method:
        for other, target in QLORA_TARGETS.items():
            if other in by_method:
                ratio = (
                    by_method["qlora"]["total_bytes"] / by_method[other]["total_bytes"]
                )
                ratios[f"qlora_over_{other}"] = {
                    "ratio": ratio,
                    "target": target,
                    "meets_target": ratio <= target,
                }
    return {
        "benchmark": "memory_methods",
        "config": config.get("config_spec", config.name),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "compiler": topology or str(devices[0].platform),
        "param_dtype": config.model.get("param_dtype", "float32"),
        "rows": rows,
        "ratios": ratios,
    }


# --- decode ---------------------------------------------------------------------


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
    the same machine state. Each decode step's time is set against the time
    its FLOPs take at this machine's measured matmul peak."""
    import types

    import flax.linen as nn

    from fmjax.inference import generate as gen

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
    module = build_model(cfg)
    params = nn.unbox(
        jax.jit(module.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    )
    ids = types.SimpleNamespace(pad_id=0, bos_id=2, eos_id=-1)  # no EOS: full length
    generator = gen.Generator(module, params, ids, max_len=cfg.max_len)
    hf_model = _hf_decoder(cfg, params, threads) if against == "hf" else None
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
        flops = batch * gen.decode_flops_per_token(cfg, prompt_len + new_tokens // 2)
        row["decode_step_flops"] = flops
        row["decode_step_at_peak_s"] = flops / peak
        row["fmjax"]["fraction_of_peak"] = flops / peak / step_s
        if hf_model is not None:
            row["hf"] = _decode_stats(theirs, batch, prompt_len, new_tokens)
            row["hf"]["fraction_of_peak"] = flops / peak / row["hf"]["decode_step_s"]
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
        "cpu": _cpu_model(),
        "devices": [str(d) for d in jax.devices()],
        "versions": _versions(),
        "peak_flops": peak,
        "peak_flops_by_library": peaks,
        "rows": rows,
    }
    return result


def _time_fmjax_generate(generator, prompts, new_tokens: int) -> dict:
    """Prefill (to the first token on the host) and the decode loop, timed apart."""
    from fmjax.inference.generate import Sampling

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

    inputs = torch.from_numpy(np.asarray(prompts)).long()
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
    inputs = torch.from_numpy(np.asarray(prompts)).long()
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


def _hf_decoder(cfg, params, threads: int):
    """HF GPT2LMHeadModel holding `params` (fmjax's GPT-2 conversion)."""
    import torch

    from fmjax.convert import gpt2

    torch.set_num_threads(threads)
    return gpt2.to_torch_model(cfg.to_dict(), params).eval()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
