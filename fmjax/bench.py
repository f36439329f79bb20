"""`fmjax bench train`: training throughput of fmjax, and of HF transformers on the
same shapes, batch, dtype and thread count, measured in one run.

Both sides run a full optimizer step (AdamW, global-norm clipping) on batches of
random token ids of the configured shape. MFU is achieved FLOP/s divided by this
machine's measured peak (the best of a large f32 matmul in XLA and in PyTorch).
Image models: `fmjax.bench_vision`; dual encoders: `fmjax.bench_clip`; `fmjax
bench memory` is here, `fmjax bench decode` in `fmjax.bench_decode`.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fmjax import sharding as shd
from fmjax.bench_rounds import alternate_rounds, in_child, round_results
from fmjax.bench_torch import hf_device, hf_train_step, torch_matmul, torch_setup
from fmjax.config import ConfigError
from fmjax.models import build_model
from fmjax.models.text import count_params
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


def random_train_batch(config) -> dict:
    """The random batch `fmjax bench train` steps on for `config`: token ids,
    random pixels of the task's batch shapes, or random image-caption pairs."""
    task = task_for(config, with_data=False)
    if task.throughput_unit == "images":
        from fmjax.bench_vision import _random_images

        return _random_images(config)
    if task.throughput_unit == "pairs":
        from fmjax.bench_clip import random_pairs

        return random_pairs(task, config.data.batch_size)
    return _random_batch(
        np.random.default_rng(0), config.data.batch_size, config.data.seq_len,
        config.model.vocab_size,
    )  # fmt: skip


def jitted_train_step(config, batch: dict):
    """(jitted step, initial state, global batch, mesh, trained params) of
    fmjax's full optimizer step of `config`'s task on `batch` (numpy)."""
    from fmjax.train.run import init_state

    mesh = shd.mesh_from_config(config.mesh)
    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    tx, lr_fn = make_optimizer(10_000, **config.optimizer)
    abstract, shardings, init = init_state(task, model, tx, mesh, seed=0)
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
        state, global_batch = init(), shd.global_batch(batch, mesh)
    return step_fn, state, global_batch, mesh, count_params(abstract.params)


def fmjax_train_step(config, batch: dict):
    """(run, compiled, trained params): `run()` does one full fmjax optimizer
    step of `config`'s task on `batch` (numpy, global), waits for it and
    returns its metrics;
    `compiled` is its XLA executable (for its cost analysis)."""
    step_fn, state, global_batch, mesh, params = jitted_train_step(config, batch)
    with shd.activate(mesh, config.mesh.rules):
        compiled = step_fn.lower(state, global_batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], global_batch)
        return jax.block_until_ready(metrics)

    return run, compiled, params


def hf_text_step(config, threads: int, device: str = "cpu"):
    """(run, versions): `run()` does one optimizer step of the config's model
    shape in HF transformers (PyTorch) on `device`, trained the same way on
    random tokens; `versions` names torch and transformers."""
    import torch
    import transformers

    device = torch_setup(threads, device)
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
    inputs = {"input_ids": inputs, "labels": labels}
    run = hf_train_step(model, config.optimizer, inputs, device=device)
    return run, {"torch": torch.__version__, "transformers": transformers.__version__}


def matmul_peak_flops(size: int = 2048, repeats: int = 40) -> dict:
    """The machine's f32 matmul FLOP/s in XLA (and PyTorch, when installed):
    the best of `repeats` timed [size, size] products each, so a moment of
    contention does not lower the peak that MFU divides by. On a GPU: JAX's
    device, full float32 products on both (`fmjax.bench_torch`)."""
    import jax.numpy as jnp

    try:
        device = hf_device()
    except ConfigError:  # a TPU: XLA's products only
        device = None
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    products = {"xla": lambda: matmul(a).block_until_ready()}
    torch_product = torch_matmul(np.array(a), device)
    if torch_product is not None:  # PyTorch installed, and for this device
        products["torch"] = torch_product
    best = {}
    for name, product in products.items():
        product()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            seconds.append(time.perf_counter() - start)
        best[name] = 2 * size**3 / min(seconds)
    return best


def bench_train(
    config, against: str = "", warmup: int = 3, steps: int = 10, rounds: int = 5
) -> dict:
    """Tokens (images, pairs) per second and MFU of fmjax's full optimizer
    step and, with `against="hf"`, HF's on the same shapes: `rounds` rounds
    of `steps` steps, the sides alternating (`alternate_rounds`); each side
    reports its median round and every round. Image and image-text models:
    `fmjax.bench_vision`, `fmjax.bench_clip`."""
    threads = int(os.environ.get("FMJAX_BENCH_THREADS", os.cpu_count() or 1))
    unit = task_for(config, with_data=False).throughput_unit
    if unit in ("images", "pairs"):
        if unit == "images":
            from fmjax.bench_vision import bench_train_images as bench_fn
        else:
            from fmjax.bench_clip import bench_train_pairs as bench_fn
        peaks = matmul_peak_flops()
        return with_speedup_bound(
            {
                "benchmark": "train",
                "config": config.get("config_spec", config.name),
                "batch_size": config.data.batch_size,
                "dtype": config.model.get("dtype"),  # a dual encoder: per tower
                "threads": threads,
                "rounds": rounds,
                "cpu": cpu_model(),
                "cpu_cores": os.cpu_count(),
                "devices": [str(d) for d in jax.devices()],
                "versions": library_versions(),
                "peak_flops": max(peaks.values()),
                "peak_flops_by_library": peaks,
                **bench_fn(
                    config, against, warmup, steps, rounds, threads, max(peaks.values())
                ),
            }
        )
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
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "versions": library_versions(),
        "peak_flops": peak,
        "peak_flops_by_library": peaks,
        "train_flops_per_token": flops_per_token,
        "fmjax_train_flops_per_token": fmjax_flops_per_token,
    }
    if against not in ("", "hf"):
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    batch = random_train_batch(config)
    steppers = {"fmjax": fmjax_train_step(config, batch)[0]}
    flops = {"fmjax": fmjax_flops_per_token}
    if against:
        steppers["hf"], versions = in_child(hf_text_step, config, threads, hf_device())
        flops["hf"] = flops_per_token
    times = alternate_rounds(steppers, warmup, steps, rounds)
    result["rounds"] = rounds
    tokens = config.data.batch_size * seq_len
    for name, rounds_s in times.items():
        result[name] = round_results(
            rounds_s, tokens, "tokens", tokens * flops[name], peak
        )
    if against:
        result["hf"].update(versions)
        result["speedup_vs_hf"] = (
            result["fmjax"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        )
    return with_speedup_bound(result)


def with_speedup_bound(result: dict) -> dict:
    """Adds "speedup_bound_at_peak" where HF ran: HF's step time over the time
    fmjax's step FLOPs take at the measured matmul peak (speedup / fmjax's
    MFU), the most any implementation doing fmjax's work could gain on HF."""
    if "speedup_vs_hf" in result:
        result["speedup_bound_at_peak"] = (
            result["speedup_vs_hf"] / result["fmjax"]["mfu"]
        )
    return result


def compiled_step_memory(config, mesh, hlo: bool = False) -> dict:
    """Compiles the real sharded train step from abstract inputs (nothing is
    allocated) and returns its per-device memory analysis and FLOPs; with
    `hlo`, also the optimised HLO text ("hlo_text")."""
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
    if hlo:
        out["hlo_text"] = compiled.as_text()
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


def cpu_model() -> str:
    """The CPU's model name and, on x86, its family and model numbers (a
    VM may name only the vendor's line, "AMD EPYC", where family 25 is Zen 3
    or 4 and family 26 Zen 5: the matmul peak doubles between them)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in f)
                if key.strip() in ("model name", "cpu family", "model")
            )
        if "model name" in fields:
            if "cpu family" not in fields:
                return fields["model name"]
            return "{} (CPU family {}, model {})".format(
                fields["model name"], fields["cpu family"], fields.get("model", "?")
            )
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def library_versions() -> dict:
    """Versions of the libraries a benchmark ran, and the malloc it ran with
    (`fmjax.host_memory.in_use`)."""
    import importlib.metadata as md

    from fmjax.host_memory import in_use

    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    out["malloc"] = in_use(os.environ)
    return out
