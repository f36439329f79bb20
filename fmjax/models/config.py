"""TransformerConfig: the shape and numerics of a BERT/GPT-style transformer,
checked when built (a bad value raises ValueError naming the field).

`kind` says which module reads it (fmjax.models.registry): "encoder"
(TextEncoder, BERT family) or "decoder" (TextDecoder, GPT family)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

TRANSFORMER_KINDS = ("encoder", "decoder")
POSITIONS = ("learned", "rope")
# quick_gelu: x * sigmoid(1.702 x), OpenAI CLIP's.
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "gelu_erfc")
DTYPES = ("float32", "bfloat16", "float16")
# Activation checkpointing of each block: "full" keeps only the block inputs
# and recomputes the rest in the backward pass; "dots" also keeps matmul outputs
# without batch dimensions (the weights' products), a middle ground.
REMAT = ("none", "full", "dots")
# How a classifier head pools the encoder's hidden states (see models/heads.py).
CLASSIFIER_POOLINGS = ("mean", "cls")
_POSITIVE_INTS = (
    "vocab_size d_model num_layers num_heads head_dim mlp_dim max_len type_vocab_size"
).split()


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a BERT/GPT-style transformer."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int = 512
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    position: str = "learned"
    rope_theta: float = 10000.0
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Encoders only: False builds no MLM head (an imported BertModel has none).
    mlm_head: bool = True
    remat: str = "none"
    # The most [B, L, V] logits one device holds while the training loss
    # (next-token or MLM) is computed: above it the LM head and cross-entropy
    # run over chunks of positions, each chunk's gradient taken as its logits
    # are made (fmjax.chunked_loss.chunked_cross_entropy). 2**27 f32 logits are 512 MiB;
    # gpt_lm:small's 32 x 128 x 8000 stay whole, gpt_lm:base's 512 x 1024 x
    # 50257 on 16 chips go 64 positions at a time. 0: never chunk.
    max_logits_elements: int = 2**27
    # The most attention scores [B, H, L, S] one device holds in a layer: above
    # it attention runs over chunks of queries, each rematerialised in the
    # backward pass (fmjax.models.attention.chunked_attention); every query row is
    # computed as before. gpt_lm:8b's 8 x 32 x 4096 x 4096 per chip of a v5p-64
    # (16 GiB of f32 scores, several copies in a backward pass) go 128 queries
    # at a time. 0: never chunk.
    max_attention_elements: int = 2**27
    # Encoders only: > 0 adds a classifier head over pooled hidden states.
    num_classes: int = 0
    classifier_pooling: str = "mean"
    kind: str = "encoder"

    def __post_init__(self):
        _check(
            self, "kind", self.kind in TRANSFORMER_KINDS, f"one of {TRANSFORMER_KINDS}"
        )
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            _check(self, name, _is_int(value) and value > 0, "a positive int")
        if self.num_kv_heads is not None:
            _check(
                self,
                "num_kv_heads",
                _is_int(self.num_kv_heads)
                and self.num_kv_heads > 0
                and self.num_heads % self.num_kv_heads == 0,
                f"None or a positive divisor of num_heads={self.num_heads}",
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            _check(self, name, 0.0 <= getattr(self, name) < 1.0, "a rate in [0, 1)")
        for name in ("rope_theta", "layer_norm_eps", "init_std"):
            _check(self, name, getattr(self, name) > 0, "a positive float")
        _check(self, "position", self.position in POSITIONS, f"one of {POSITIONS}")
        _check(
            self, "activation", self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}"
        )
        for name in ("dtype", "param_dtype"):
            _check(self, name, getattr(self, name) in DTYPES, f"one of {DTYPES}")
        _check(self, "mlm_head", isinstance(self.mlm_head, bool), "a bool")
        _check(self, "remat", self.remat in REMAT, f"one of {REMAT}")
        _check(
            self,
            "max_logits_elements",
            _is_int(self.max_logits_elements) and self.max_logits_elements >= 0,
            "0 (never chunk the loss) or a positive int",
        )
        _check(
            self,
            "max_attention_elements",
            _is_int(self.max_attention_elements) and self.max_attention_elements >= 0,
            "0 (never chunk attention) or a positive int",
        )
        _check(
            self,
            "num_classes",
            _is_int(self.num_classes) and self.num_classes >= 0,
            "0 (no classifier head) or a positive int",
        )
        _check(
            self,
            "classifier_pooling",
            self.classifier_pooling in CLASSIFIER_POOLINGS,
            f"one of {CLASSIFIER_POOLINGS}",
        )
        if self.position == "rope":
            _check(self, "head_dim", self.head_dim % 2 == 0, "an even int with RoPE")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TransformerConfig: unknown keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(config, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(
            f"{type(config).__name__}.{name}={getattr(config, name)!r}: "
            f"expected {expected}"
        )
