"""The adaptation method of a run: which params train, and how the model runs.

    adaptation = Adaptation.from_config(config.adapt, model_config)
    trained, frozen = adaptation.split(params, rng)          # at init
    out = adaptation.apply(model, trained, frozen, rng, train, *inputs, **kw)

Methods (HF PEFT names):
  full    every param trains; `frozen` is empty.
  lora    LoRA adapters on `lora_targets` kernels over a frozen base; each
          adapted matmul adds its low-rank path (`fmjax.adapt.lora`).
  qlora   the same over a base whose kernels are NF4 codes (block size
          `quant_block_size`, double-quantised absmax), each dequantised to
          `compute_dtype` inside its own matmul. As bitsandbytes' 4-bit
          loading, the embedding tables are not quantised unless
          `quantize_embeddings`; the frozen params that stay unquantised
          (embeddings, norms, biases) are stored in `compute_dtype`, as
          loading a base in that dtype does (no change with float32).
  prefix  learned per-layer K/V slots (optionally through a reparam MLP).
  prompt  T soft tokens prepended to the input.

`full` with `freeze_patterns` (config `adapt.freeze`) keeps the params they
match frozen and trains the rest (LiT: a locked pretrained text tower, e.g.
`adapt.freeze=("text/.*",)`).

In every method but `full`, the params matching `train_patterns` (a task head
such as `classifier/...`, as PEFT's `modules_to_save`) train too. The trained
tree is `{"model": <those params, at their model paths>, <method>: <adapter
params>}`, so an adapter checkpoint or export holds the adapter and the head
only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

from fmjax.adapt import lora as lora_lib
from fmjax.adapt import prompts
from fmjax.adapt.masks import compile_patterns, count_params
from fmjax.adapt.quant import (
    dequantize_tree,
    is_kernel_matrix,
    is_matrix,
    is_quantized,
    nbytes,
    quantize_tree,
)
from fmjax.models.config import DTYPES, TransformerConfig
from fmjax.models.registry import param_axes

METHODS = ("full", "lora", "qlora", "prefix", "prompt")


@dataclasses.dataclass(frozen=True)
class Adaptation:
    method: str
    model_config: TransformerConfig
    lora: lora_lib.LoraConfig | None = None
    prompt: prompts.PromptConfig | None = None
    prefix: prompts.PrefixConfig | None = None
    quant_block_size: int = 64
    double_quant: bool = True
    # QLoRA: also store the (token, position, type) embedding tables as NF4.
    quantize_embeddings: bool = False
    compute_dtype: str = "float32"
    train_patterns: tuple[str, ...] = ()
    freeze_patterns: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"adapt.method={self.method!r}: expected one of {METHODS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(
                f"adapt.compute_dtype={self.compute_dtype!r}: expected one of {DTYPES}"
            )
        needed = {
            "lora": "lora",
            "qlora": "lora",
            "prefix": "prefix",
            "prompt": "prompt",
        }
        if self.method in needed and getattr(self, needed[self.method]) is None:
            raise ValueError(
                f"adapt.method={self.method!r} needs a {needed[self.method]} config"
            )
        if self.train_patterns:
            compile_patterns(self.train_patterns, "adapt.train_patterns")
        if self.freeze_patterns:
            if self.method != "full":
                raise ValueError(
                    f"adapt.freeze={self.freeze_patterns!r} applies to method "
                    f"'full'; with {self.method!r} every param outside "
                    "adapt.train_patterns is frozen already"
                )
            compile_patterns(self.freeze_patterns, "adapt.freeze")

    @classmethod
    def from_config(cls, adapt, model_config: TransformerConfig) -> Adaptation:
        """From a config's `adapt` group (`fmjax.config.base_config`); a bad value
        raises ValueError naming the `adapt.` key."""
        method = adapt.method
        kwargs: dict[str, Any] = {}
        if method in ("lora", "qlora"):
            kwargs["lora"] = lora_lib.LoraConfig(
                rank=adapt.lora_rank,
                alpha=float(adapt.lora_alpha),
                dropout=float(adapt.lora_dropout),
                targets=_targets(adapt.lora_targets),
            )
        elif method == "prompt":
            kwargs["prompt"] = prompts.PromptConfig(
                num_tokens=adapt.prompt_tokens, init=adapt.prompt_init
            )
        elif method == "prefix":
            kwargs["prefix"] = prompts.PrefixConfig(
                num_tokens=adapt.prefix_tokens,
                reparam=adapt.prefix_reparam,
                reparam_hidden=adapt.prefix_hidden,
            )
        return cls(
            method=method,
            model_config=model_config,
            quant_block_size=adapt.quant_block_size,
            double_quant=adapt.double_quant,
            quantize_embeddings=adapt.get("quantize_embeddings", False),
            compute_dtype=adapt.compute_dtype,
            train_patterns=tuple(adapt.train_patterns),
            freeze_patterns=tuple(adapt.get("freeze", ())),
            **kwargs,
        )

    # --- init -------------------------------------------------------------------

    def split(self, params, rng) -> tuple[dict, dict]:
        """(trained, frozen) from the model's params. Traceable (jit/eval_shape)."""
        if self.method == "full":
            if not self.freeze_patterns:
                return params, {}
            locked, trained = self._partition(params, self.freeze_patterns)
            return trained, locked
        head, base = self._partition(params, self.train_patterns)
        if self.method in ("lora", "qlora"):
            axes = param_axes(self.model_config)
            adapter = lora_lib.init_lora(base, self.lora, rng, axes)
            if self.method == "qlora":
                base = quantize_tree(
                    base,
                    is_matrix if self.quantize_embeddings else is_kernel_matrix,
                    block_size=self.quant_block_size,
                    double_quant=self.double_quant,
                    dtype=self.compute_dtype,
                )
                base = _floats_as(base, jnp.dtype(self.compute_dtype))
        elif self.method == "prompt":
            adapter = prompts.init_prompt(base, self.prompt, rng)
        else:
            adapter = prompts.init_prefix(self.model_config, self.prefix, rng)
        return {"model": head, self.method: adapter}, base

    def _partition(self, params, patterns) -> tuple[dict, dict]:
        """(params matching `patterns`, the rest)."""
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        head = {}
        if patterns:
            regex = compile_patterns(patterns)
            head = {p: v for p, v in flat.items() if regex.fullmatch(p)}
        base = {p: v for p, v in flat.items() if p not in head}
        unflatten = lambda d: flax.traverse_util.unflatten_dict(d, sep="/")  # noqa: E731
        return unflatten(head), unflatten(base)

    # --- per step ---------------------------------------------------------------

    def apply(self, model, trained, frozen, rng, train: bool, *args, **kwargs):
        """`model.apply` with this adaptation: the base under the trained params,
        the adapter's model inputs (prompt, prefix), and LoRA beside each adapted
        matmul. `rng` draws the LoRA dropout; model rngs go in `rngs=`."""
        if self.method == "full":
            params = _merge_trees(frozen, trained) if frozen else trained
            return model.apply({"params": params}, *args, **kwargs)
        params = _merge_trees(frozen, trained.get("model", {}))
        if self.method in ("prompt", "prefix"):
            extra = prompts.model_kwargs(
                self.method, trained[self.method], self.model_config
            )
            return model.apply({"params": params}, *args, **kwargs, **extra)
        with lora_lib.wrap_matmuls(
            trained[self.method], self.lora, rng=rng, deterministic=not train
        ):
            return model.apply({"params": params}, *args, **kwargs)

    def merged(self, trained, frozen) -> tuple[dict, dict]:
        """For serving: (params, model kwargs) with LoRA folded into the kernels
        and every NF4 kernel dequantised; prefix/prompt keep their kwargs."""
        if self.method == "full":
            return (_merge_trees(frozen, trained) if frozen else trained), {}
        params = _merge_trees(frozen, trained.get("model", {}))
        kwargs: dict[str, Any] = {}
        if self.method in ("lora", "qlora"):
            params = lora_lib.merge(params, trained[self.method], self.lora)
        else:
            kwargs = prompts.model_kwargs(
                self.method, trained[self.method], self.model_config
            )
        return dequantize_tree(params, jnp.dtype(self.compute_dtype)), kwargs

    # --- reporting ---------------------------------------------------------------

    def summary(self, trained, frozen) -> dict[str, Any]:
        """Param counts and bytes: what PEFT's print_trainable_parameters shows,
        plus the memory of the frozen base (NF4 codes count their real bytes)."""
        num_trained = count_params(trained)
        num_all = num_trained + count_params(frozen)
        quantized = [
            x for x in jax.tree.leaves(frozen, is_leaf=is_quantized) if is_quantized(x)
        ]
        extra = {}
        if quantized:
            extra = {
                "quantized_bytes": sum(nbytes(q) for q in quantized),
                "quantized_bytes_f32": 4 * sum(q.size for q in quantized),
            }
        return {
            "method": self.method,
            "trainable_params": num_trained,
            "all_params": num_all,
            "trainable_percent": 100.0 * num_trained / max(num_all, 1),
            "trained_bytes": tree_bytes(trained),
            "frozen_bytes": tree_bytes(frozen),
            "frozen_bytes_f32": 4 * count_params(frozen),
            **extra,
        }


def trainable_line(summary: dict) -> str:
    """`trainable parameters: 74,498 / 22,787,714 (0.3269%)`"""
    return (
        f"trainable parameters: {summary['trainable_params']:,d} / "
        f"{summary['all_params']:,d} ({summary['trainable_percent']:.4f}%)"
    )


def tree_bytes(tree) -> int:
    """Bytes of a tree's arrays as stored (a QuantizedTensor: codes + scales)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            total += nbytes(leaf)
        else:
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _targets(targets) -> tuple[str, ...]:
    """Target patterns; "all-linear" (alone) names every block projection."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return lora_lib.ALL_LINEAR if targets == ("all-linear",) else targets


def _merge_trees(base, overlay):
    """`base` with the leaves of `overlay` added (or replaced) at their paths."""
    flat = flax.traverse_util.flatten_dict(base, sep="/")
    flat.update(flax.traverse_util.flatten_dict(overlay, sep="/"))
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _floats_as(tree, dtype):
    """`tree` with its floating arrays (not NF4 codes) in `dtype`."""
    return jax.tree.map(
        lambda x: (
            x.astype(dtype)
            if not is_quantized(x) and jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        tree,
        is_leaf=is_quantized,
    )
