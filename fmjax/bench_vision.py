"""`fmjax bench train` for ViT configs: images/s of a full optimizer step.

With `--against hf`, HF transformers (PyTorch) trains the same shapes, batch,
mask ratio, optimizer and thread count in float32 in the same run: MAE configs
(`vit_mae`) against `ViTMAEForPreTraining` (norm_pix_loss as configured),
supervised ones (`vit`) against `ViTForImageClassification`. The two sides
alternate in rounds of `steps` steps, so both see the same machine state; each
side reports the median of its rounds. FLOPs per step come from XLA's cost
analysis of fmjax's compiled step (the same math on both sides), and MFU is
against this machine's measured matmul peak.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

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


def _hf_step(config, batch: dict, threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _hf_model(config)
    model.train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
        eps=opt.eps, weight_decay=opt.weight_decay,
    )  # fmt: skip
    pixels = torch.from_numpy(
        np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))
    )
    kwargs = {"pixel_values": pixels}
    if config.objective.name == "image_classify":
        kwargs["labels"] = torch.from_numpy(batch["labels"]).long()

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()

    return run


def bench_train_images(
    config, against: str, warmup: int, steps: int, threads: int, peak: float
) -> dict:
    """fmjax (and HF) images/s and MFU for a ViT config; see the module doc."""
    from fmjax.bench import fmjax_train_step

    if against not in ("", "hf"):
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    if against and config.objective.name not in HF_OBJECTIVES:
        raise ConfigError(
            f"--against hf: HF transformers has no {config.objective.name!r} "
            f"trainer to compare with (objectives compared: {HF_OBJECTIVES})"
        )
    if against and config.model.dtype != "float32":
        raise ConfigError(
            f"--against hf compares float32 only, got model.dtype={config.model.dtype}"
        )
    batch = _random_images(config)
    runs = {"fmjax": fmjax_train_step(config, batch)}
    cost = runs["fmjax"][1].cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0))
    steppers = {"fmjax": runs["fmjax"][0]}
    if against:
        steppers["hf"] = _hf_step(config, batch, threads)
    for run in steppers.values():
        for _ in range(warmup):
            run()
    rounds = {name: [] for name in steppers}
    for _ in range(5):  # alternate, so both sides see the same machine state
        for name, run in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            rounds[name].append((time.perf_counter() - start) / steps)
    images = config.data.batch_size
    result = {"train_flops_per_step": flops}
    for name, times in rounds.items():
        step_s = statistics.median(times)
        result[name] = {
            "step_s": step_s,
            "step_s_rounds": times,
            "images_per_s": images / step_s,
            "mfu": flops / step_s / peak,
        }
    if against:
        import torch
        import transformers

        result["hf"].update(
            torch=torch.__version__, transformers=transformers.__version__
        )
        result["speedup_vs_hf"] = (
            result["fmjax"]["images_per_s"] / result["hf"]["images_per_s"]
        )
    return result
