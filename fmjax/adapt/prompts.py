"""Prompt tuning and prefix tuning: adapter params that enter the model call.

Neither touches the base params. The trainer differentiates the loss with
respect to the adapter tree only and passes `model_kwargs(...)` to the model:
  * prompt tuning (Lester et al. 2021): `{"prompt": [T, D]}`, T soft tokens
    prepended to every row (`prompt_TD=`; see `fmjax.models.text`).
  * prefix tuning (Li & Liang 2021): per-layer key/value slots
    (`prefix_kv=(prefix_k, prefix_v)`, [num_layers, T, G, K] each). With
    `reparam`, the params are an embedding [T, D] and a tanh MLP
    D -> hidden -> num_layers * 2 * G * K whose output is reshaped into the
    K/V (the MLP is a training device: export `prefix_kv(...)` for serving);
    without, `{"key", "value"}` are the K/V themselves.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.config import TransformerConfig

Array = jax.Array

PROMPT_INITS = ("vocab", "random")
METHODS = ("prompt", "prefix")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """T soft tokens; init "vocab": the embeddings of T vocabulary tokens,
    "random": normal with the token embeddings' standard deviation."""

    num_tokens: int = 20
    init: str = "vocab"

    def __post_init__(self):
        if not _positive_int(self.num_tokens):
            raise ValueError(
                f"PromptConfig.num_tokens={self.num_tokens!r}: expected a positive int"
            )
        if self.init not in PROMPT_INITS:
            raise ValueError(
                f"PromptConfig.init={self.init!r}: expected one of {PROMPT_INITS}"
            )


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """T prefix slots per layer, optionally produced by a reparameterisation MLP."""

    num_tokens: int = 10
    reparam: bool = True
    reparam_hidden: int = 512

    def __post_init__(self):
        for name in ("num_tokens", "reparam_hidden"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(
                    f"PrefixConfig.{name}={getattr(self, name)!r}: expected a "
                    "positive int"
                )
        if not isinstance(self.reparam, bool):
            raise ValueError(f"PrefixConfig.reparam={self.reparam!r}: expected a bool")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _token_embedding(params) -> Array:
    params = nn.unbox(params)
    try:
        return params["token_embed"]["embedding"]
    except (KeyError, TypeError) as e:
        raise KeyError(
            f"init_prompt: params have no token_embed/embedding; top-level keys: "
            f"{sorted(params) if isinstance(params, dict) else type(params)}"
        ) from e


def init_prompt(params, config: PromptConfig, rng: Array, *, vocab_ids=None):
    """{"prompt": [T, D] float32} from the base model's token embeddings.

    "vocab": rows of the embedding at `vocab_ids` ([T] ints) or, if None, at T
    distinct ids drawn uniformly (Lester et al. draw from the most frequent
    tokens; pass such ids as `vocab_ids` to do the same).
    """
    embedding_VD = _token_embedding(params)
    vocab_size, d_model = embedding_VD.shape
    num = config.num_tokens
    if config.init == "random":
        if vocab_ids is not None:
            raise ValueError("init_prompt: vocab_ids given with init='random'")
        std = jnp.std(embedding_VD.astype(jnp.float32))
        return {"prompt": std * jax.random.normal(rng, (num, d_model), jnp.float32)}
    if vocab_ids is None:  # drawn in range: no check, so this also runs traced
        ids_N = jax.random.choice(rng, vocab_size, (num,), replace=num > vocab_size)
        return {"prompt": jnp.take(embedding_VD, ids_N, axis=0).astype(jnp.float32)}
    ids_N = jnp.asarray(vocab_ids)
    if ids_N.shape != (num,) or not jnp.issubdtype(ids_N.dtype, jnp.integer):
        raise ValueError(
            f"init_prompt: vocab_ids {ids_N.dtype}{list(ids_N.shape)}; expected "
            f"int[{num}] (PromptConfig.num_tokens)"
        )
    if bool(jnp.any((ids_N < 0) | (ids_N >= vocab_size))):
        raise ValueError(
            f"init_prompt: vocab_ids {ids_N.tolist()} outside [0, {vocab_size})"
        )
    return {"prompt": jnp.take(embedding_VD, ids_N, axis=0).astype(jnp.float32)}


def _prefix_width(model_config: TransformerConfig) -> int:
    """Outputs of the reparam MLP: layers * (k, v) * kv heads * head dim."""
    cfg = model_config
    return cfg.num_layers * 2 * cfg.kv_heads * cfg.head_dim


def init_prefix(model_config: TransformerConfig, config: PrefixConfig, rng: Array):
    """Prefix params, float32.

    reparam: {"embedding": [T, D] ~ N(0, 1), "mlp": {"up": {"kernel" [D, hidden]
    ~ N(0, 1/D), "bias"}, "down": {"kernel" [hidden, out] ~ N(0, init_std^2),
    "bias"}}} with zero biases; else {"key", "value": [layers, T, G, K] ~
    N(0, init_std^2)}, init_std being the base model's.
    """
    cfg, num = model_config, config.num_tokens
    std = cfg.init_std
    keys = jax.random.split(rng, 3)
    if not config.reparam:
        shape = (cfg.num_layers, num, cfg.kv_heads, cfg.head_dim)
        return {
            "key": std * jax.random.normal(keys[0], shape, jnp.float32),
            "value": std * jax.random.normal(keys[1], shape, jnp.float32),
        }
    hidden, width = config.reparam_hidden, _prefix_width(cfg)
    normal = jax.random.normal
    return {
        "embedding": normal(keys[0], (num, cfg.d_model), jnp.float32),
        "mlp": {
            "up": {
                "kernel": normal(keys[1], (cfg.d_model, hidden), jnp.float32)
                / math.sqrt(cfg.d_model),
                "bias": jnp.zeros((hidden,), jnp.float32),
            },
            "down": {
                "kernel": std * normal(keys[2], (hidden, width), jnp.float32),
                "bias": jnp.zeros((width,), jnp.float32),
            },
        },
    }


def prefix_kv(prefix_params, model_config: TransformerConfig) -> tuple[Array, Array]:
    """(prefix_k, prefix_v), each [num_layers, T, G, K], from either param layout."""
    cfg = model_config
    if "key" in prefix_params and "value" in prefix_params:
        prefix_k, prefix_v = prefix_params["key"], prefix_params["value"]
        expected = (cfg.num_layers, prefix_k.shape[1], cfg.kv_heads, cfg.head_dim)
        if prefix_k.shape != expected or prefix_v.shape != expected:
            raise ValueError(
                f"prefix key {prefix_k.shape} / value {prefix_v.shape}: expected "
                f"{expected} (layers, T, kv heads, head dim)"
            )
        return prefix_k, prefix_v
    if "embedding" not in prefix_params or "mlp" not in prefix_params:
        raise KeyError(
            f"prefix params have keys {sorted(prefix_params)}; expected "
            "{'key', 'value'} or {'embedding', 'mlp'}"
        )
    emb_TD, mlp = prefix_params["embedding"], prefix_params["mlp"]
    up, down = mlp["up"], mlp["down"]
    if emb_TD.ndim != 2 or emb_TD.shape[1] != cfg.d_model:
        raise ValueError(
            f"prefix embedding {emb_TD.shape}: expected [T, {cfg.d_model}]"
        )
    if down["kernel"].shape[1] != _prefix_width(cfg):
        raise ValueError(
            f"prefix mlp down kernel {down['kernel'].shape}: expected [hidden, "
            f"{_prefix_width(cfg)}] (layers * 2 * kv heads * head dim)"
        )
    hi = jax.lax.Precision.HIGHEST
    h_TF = jnp.tanh(jnp.matmul(emb_TD, up["kernel"], precision=hi) + up["bias"][None])
    out_TO = jnp.matmul(h_TF, down["kernel"], precision=hi) + down["bias"][None]
    kv_2xTGK = jnp.reshape(
        out_TO, (emb_TD.shape[0], cfg.num_layers, 2, cfg.kv_heads, cfg.head_dim)
    ).transpose(2, 1, 0, 3, 4)
    return kv_2xTGK[0], kv_2xTGK[1]


def model_kwargs(method: str, adapter_params, model_config: TransformerConfig):
    """Model-call kwargs for an adapter: {"prompt_TD": ...} or {"prefix_kv": ...}."""
    if method == "prompt":
        if "prompt" not in adapter_params:
            raise KeyError(
                f"prompt adapter params have keys {sorted(adapter_params)}; "
                "expected 'prompt'"
            )
        return {"prompt_TD": adapter_params["prompt"]}
    if method == "prefix":
        return {"prefix_kv": prefix_kv(adapter_params, model_config)}
    raise ValueError(f"adapter method={method!r}: expected one of {METHODS}")
