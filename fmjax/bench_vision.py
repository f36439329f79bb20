"""`fmjax bench train` for ViT configs: images/s of a full optimizer step.

With `--against hf`, HF transformers (PyTorch) trains the same shapes, batch,
mask ratio, optimizer and thread count in float32 in the same run: MAE configs
(`vit_mae`) against `ViTMAEForPreTraining` (norm_pix_loss as configured),
supervised ones (`vit`) against `ViTForImageClassification`. The two sides
alternate in rounds of `steps` steps, so both see the same machine state; each
side reports the median of its rounds (`compare_train_steps`, which
`fmjax.bench_clip` shares). FLOPs per step come from XLA's cost analysis of
fmjax's compiled step (the same math on both sides), and MFU is against this
machine's measured matmul peak. `params` gives both sides' trained parameter
counts: equal for MAE; HF's ViTForImageClassification also learns the
position table that a sin-cos fmjax ViT keeps fixed.
"""

from __future__ import annotations

import numpy as np

from fmjax.bench_rounds import in_child
from fmjax.bench_torch import hf_device, hf_train_step, torch_setup
from fmjax.config import ConfigError
from fmjax.tasks import task_for

HF_OBJECTIVES = ("mae", "image_classify")


def _random_images(config) -> dict[str, np.ndarray]:
    task = task_for(config, with_data=False)
    rng = np.random.default_rng(0)
    batch = {}
    for key, spec in task.abstract_batch(config.data.batch_size).items():
        if key == "labels":
            classes = max(task.model_config.num_classes, 1)
            batch[key] = rng.integers(0, classes, spec.shape).astype(spec.dtype)
        elif key == "weights":
            batch[key] = np.ones(spec.shape, spec.dtype)
        else:
            batch[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return batch


def _hf_model(config):
    """The HF model of the config's shapes."""
    import transformers

    m, objective = task_for(config, with_data=False).model_config, config.objective
    heads = {"num_attention_heads": m.num_heads}
    if m.num_heads * m.head_dim != m.d_model:
        raise ConfigError(
            f"--against hf: HF ViT has head_dim = d_model / num_heads; got "
            f"num_heads={m.num_heads} x head_dim={m.head_dim} != d_model={m.d_model}"
        )
    common = dict(
        hidden_size=m.d_model, num_hidden_layers=m.num_layers,
        intermediate_size=m.mlp_dim, image_size=m.image_size,
        patch_size=m.patch_size, num_channels=m.channels, hidden_act="gelu",
        hidden_dropout_prob=m.dropout_rate,
        attention_probs_dropout_prob=m.attention_dropout_rate,
        layer_norm_eps=m.layer_norm_eps, **heads,
    )  # fmt: skip
    if objective.name == "mae":
        hf_config = transformers.ViTMAEConfig(
            decoder_hidden_size=m.decoder_d_model,
            decoder_num_hidden_layers=m.decoder_layers,
            decoder_num_attention_heads=m.decoder_heads,
            decoder_intermediate_size=m.decoder_mlp_dim,
            mask_ratio=objective.mask_ratio,
            norm_pix_loss=objective.norm_pix_loss,
            **common,
        )
        return transformers.ViTMAEForPreTraining(hf_config)
    hf_config = transformers.ViTConfig(num_labels=m.num_classes, **common)
    return transformers.ViTForImageClassification(hf_config)


def _hf_step(config, batch: dict, threads: int, device: str = "cpu"):
    """(run, trained params) of HF's model of the config on `batch`, on
    `device`."""
    import torch

    device = torch_setup(threads, device)
    model = _hf_model(config)
    pixels = torch.from_numpy(
        np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))
    )
    kwargs = {"pixel_values": pixels}
    if config.objective.name == "image_classify":
        kwargs["labels"] = torch.from_numpy(batch["labels"]).long()
    run = hf_train_step(model, config.optimizer, kwargs, device=device)
    return run, sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_hf_float32(dtypes: dict[str, str]) -> None:
    """Refuses --against hf when a part of the model computes in other than
    float32 (`dtypes`: {config key: dtype})."""
    for key, dtype in dtypes.items():
        if dtype != "float32":
            raise ConfigError(f"--against hf compares float32 only, got {key}={dtype}")


def step_flops(compiled) -> float:
    """XLA's FLOPs of a whole compiled step, with those of `fmjax.native`'s
    ops: its cost analysis counts one device's share of an SPMD program, so
    that times the devices it runs on (two on a CPU host that
    `fmjax.host_devices` splits)."""
    import jax

    from fmjax.native import custom_call_flops

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    devices = len(jax.tree.leaves(compiled.input_shardings)[0].device_set)
    own = custom_call_flops(compiled.as_text())  # fmjax.native's ops, unseen by XLA
    return (float(cost.get("flops", 0.0)) + own) * devices


def compare_train_steps(
    config, batch: dict, hf_step, unit: str, warmup: int, steps: int, rounds: int,
    peak: float, same_params: bool = False,
) -> dict:  # fmt: skip
    """fmjax's full optimizer step of `config` on `batch` and, unless
    `hf_step` is None, HF's ((run, trained params), built on the same batch):
    `warmup` steps each, then `rounds` rounds of `steps` steps alternating
    between the sides, so both see the same machine state. Each side reports
    the median round, every round, `{unit}_per_s` (rows of `batch` per
    second) and MFU of fmjax's XLA FLOPs against `peak`. `same_params`:
    refuse, before timing, sides whose trained parameter counts differ."""
    from fmjax.bench import fmjax_train_step
    from fmjax.bench_rounds import alternate_rounds, round_results

    run, compiled, fmjax_params = fmjax_train_step(config, batch)
    flops = step_flops(compiled)
    steppers, params = {"fmjax": run}, {"fmjax": fmjax_params}
    if hf_step is not None:
        steppers["hf"], params["hf"] = hf_step
        if same_params and params["hf"] != fmjax_params:
            raise ConfigError(
                f"--against hf: fmjax trains {fmjax_params} parameters, HF "
                f"{params['hf']}: HF's model does not have the config's shapes"
            )
    times = alternate_rounds(steppers, warmup, steps, rounds)
    rows = len(batch["images"])
    result = {"train_flops_per_step": flops, "params": params}
    for name, rounds_s in times.items():
        result[name] = round_results(rounds_s, rows, unit, flops, peak)
    if hf_step is not None:
        import torch
        import transformers

        result["hf"].update(
            torch=torch.__version__, transformers=transformers.__version__
        )
        result["speedup_vs_hf"] = (
            result["fmjax"][f"{unit}_per_s"] / result["hf"][f"{unit}_per_s"]
        )
    return result


def bench_train_images(
    config, against: str, warmup: int, steps: int, rounds: int, threads: int,
    peak: float,
) -> dict:  # fmt: skip
    """fmjax (and HF) images/s and MFU for a ViT config; see the module doc."""
    if against not in ("", "hf"):
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    if against and config.objective.name not in HF_OBJECTIVES:
        raise ConfigError(
            f"--against hf: HF transformers has no {config.objective.name!r} "
            f"trainer to compare with (objectives compared: {HF_OBJECTIVES})"
        )
    if against:
        check_hf_float32({"model.dtype": config.model.dtype})
    batch = _random_images(config)
    hf_step = None
    if against:
        hf_step = in_child(_hf_step, config, batch, threads, hf_device())
    return compare_train_steps(
        config, batch, hf_step, "images", warmup, steps, rounds, peak
    )
