"""Text transformers: TextEncoder (BERT family) and TextDecoder (GPT family).

Both take packed batches: `segment_ids_BL` numbers the documents in a row (0 is
padding) and attention never crosses a segment boundary; `positions_BL`
restarts at 0 for each document.

Prompt and prefix tuning (`fmjax.adapt.prompts`) enter as call arguments, not
params, so the base param tree is unchanged:
  * `prompt_TD` [T,D]: T soft tokens prepended to every row's embedded sequence
    (encoder: before the embedding LayerNorm; decoder: after the position sum).
    Soft tokens have no position: no learned position embedding is added, and
    with RoPE they are rotated by angle 0 (like prefix keys); real tokens keep
    `positions_BL`, so `max_len` bounds the text alone. Every non-padding query
    attends to the soft tokens; soft tokens attend as segment 1 (the decoder's
    soft tokens, being first, see only each other). The outputs drop the T soft
    positions, so shapes stay [B,L,...]. The encoder needs unpacked rows
    (segment ids in {0, 1}): its soft tokens read segment 1, so with packed rows
    later documents would see the first one through them. The decoder's soft
    tokens read no text, so packed decoder rows are exact.
  * `prefix_kv` = (prefix_k, prefix_v), each [num_layers, T, G, K]: layer i's attention
    reads T extra key/value slots in front of its own (see `layers.Attention`),
    visible to every non-padding query, in the decoder too.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax import chunked_loss, objectives
from fmjax.adapt.quant import is_quantized
from fmjax.models.attention import make_attention_mask
from fmjax.models.config import TransformerConfig
from fmjax.models.dense import EinsumDense, Embed
from fmjax.models.heads import classifier_logits
from fmjax.models.layers import Block, LayerNorm, activation_fn, residual_init_std
from fmjax.sharding import positions_per_chunk

Array = jax.Array


def count_params(params) -> int:
    """Number of scalars in a param tree (arrays, ShapeDtypeStructs or boxed)."""
    leaves = jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )
    total = 0
    for leaf in leaves:
        value = leaf.unbox(apply_constraint=False) if hasattr(leaf, "unbox") else leaf
        total += math.prod(value.shape)
    return total


def _default_inputs(tokens_BL, segment_ids_BL, positions_BL, max_len):
    batch, length = tokens_BL.shape
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones((batch, length), jnp.int32)
    if positions_BL is None:
        if length > max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={max_len}")
        positions_BL = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    for name, x in (("segment_ids_BL", segment_ids_BL), ("positions_BL", positions_BL)):
        if x.shape != tokens_BL.shape:
            raise ValueError(
                f"{name} has shape {x.shape}; expected tokens' shape {tokens_BL.shape}"
            )
    return segment_ids_BL, positions_BL


def _check_adapter_inputs(cfg: TransformerConfig, prompt_TD, prefix_kv):
    """(soft tokens, prefix slots), after shape checks."""
    num_prompt = num_prefix = 0
    if prompt_TD is not None:
        if prompt_TD.ndim != 2 or prompt_TD.shape[1] != cfg.d_model:
            raise ValueError(
                f"prompt_TD has shape {prompt_TD.shape}; expected [T, {cfg.d_model}]"
            )
        num_prompt = prompt_TD.shape[0]
    if prefix_kv is not None:
        if not isinstance(prefix_kv, (tuple, list)) or len(prefix_kv) != 2:
            raise ValueError(
                f"prefix_kv is a {type(prefix_kv).__name__}; expected "
                "(prefix_k, prefix_v)"
            )
        num_prefix = prefix_kv[0].shape[1] if prefix_kv[0].ndim == 4 else -1
        expected = (cfg.num_layers, num_prefix, cfg.kv_heads, cfg.head_dim)
        for name, x in zip("kv", prefix_kv, strict=True):
            if x.shape != expected or num_prefix < 1:
                raise ValueError(
                    f"prefix_kv {name} has shape {x.shape}; expected [num_layers="
                    f"{cfg.num_layers}, T, kv_heads={cfg.kv_heads}, "
                    f"head_dim={cfg.head_dim}] with the same T >= 1 for k and v"
                )
    return num_prompt, num_prefix


def _prepend_prompt(x_BLD: Array, prompt_TD: Array | None) -> Array:
    """[B, T+L, D]: the soft tokens in front of every row."""
    if prompt_TD is None:
        return x_BLD
    batch = x_BLD.shape[0]
    prompt_BTD = jnp.broadcast_to(
        prompt_TD.astype(x_BLD.dtype)[None], (batch, *prompt_TD.shape)
    )
    return jnp.concatenate([prompt_BTD, x_BLD], axis=1)


def _adapted_mask_and_positions(
    segment_ids_BL, positions_BL, num_prompt: int, num_prefix: int, causal: bool
):
    """Mask [B,1,T+L,T'+T+L] and positions [B,T+L] with T soft tokens in front
    (segment 1, position 0; see the module docstring) and T' prefix slots."""
    if not num_prompt:
        mask = make_attention_mask(segment_ids_BL, causal, num_prefix)
        return mask, positions_BL
    batch, _ = segment_ids_BL.shape
    soft_BT = jnp.ones((batch, num_prompt), segment_ids_BL.dtype)
    segment_ids_BS = jnp.concatenate([soft_BT, segment_ids_BL], axis=1)
    soft_positions_BT = jnp.zeros((batch, num_prompt), positions_BL.dtype)
    positions_BS = jnp.concatenate([soft_positions_BT, positions_BL], axis=1)
    mask_B1SS = make_attention_mask(segment_ids_BS, causal, num_prefix)
    # Every non-padding query of any segment reads the soft tokens.
    soft_columns = slice(num_prefix, num_prefix + num_prompt)
    real_query_B1L1 = (segment_ids_BL != 0)[:, None, :, None]
    mask_B1SS = mask_B1SS.at[:, :, num_prompt:, soft_columns].set(
        jnp.broadcast_to(real_query_B1L1, (*real_query_B1L1.shape[:3], num_prompt))
    )
    return mask_B1SS, positions_BS


def _layer_prefix(prefix_kv, layer: int):
    if prefix_kv is None:
        return None
    prefix_k, prefix_v = prefix_kv
    return prefix_k[layer], prefix_v[layer]


def block_class(config: TransformerConfig):
    """Block, or Block under activation checkpointing when `config.remat` asks.

    Call it positionally: (x, mask, positions, prefix_kv, deterministic); the last
    is static for remat.
    """
    if config.remat == "none":
        return Block
    policy = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[config.remat]
    # static_argnums counts `self` as 0: deterministic is the 5th argument.
    return nn.remat(Block, policy=policy, static_argnums=(5,))


def _embed_tokens(cfg: TransformerConfig, tokens_BL: Array, positions_BL: Array):
    """Token embeddings plus learned positions (none with RoPE, which rotates q/k
    instead). Returns the token Embed too: the tied output head reads it."""
    token_embed = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "token_embed")
    x_BLD = token_embed(tokens_BL)
    if cfg.position == "learned":
        position_embed = _embed(cfg, cfg.max_len, ("length", "embed"), "position_embed")
        x_BLD = x_BLD + position_embed(positions_BL)
    return token_embed, x_BLD


def _embed(cfg: TransformerConfig, num: int, axes: tuple[str, str], name: str):
    return Embed(
        num,
        cfg.d_model,
        axes,
        init_std=cfg.init_std,
        param_dtype=cfg.params_dtype,
        name=name,
    )


def _head_outputs(
    cfg: TransformerConfig,
    logits_fn,
    head_in_BLD: Array,
    loss_targets: tuple[Array, Array] | None,
    initializing: bool,
) -> dict[str, Array]:
    """{"logits": logits_fn(head_in_BLD)} [B,L,V], and with `loss_targets` =
    (targets_BL, weights_BL) also "loss_sums", the summed metrics of
    `objectives.weighted_cross_entropy`. When the logits would exceed
    `cfg.max_logits_elements` per device, the sums come from
    `chunked_loss.chunked_cross_entropy` instead and there are no "logits": the
    whole [B,L,V] array exists in neither pass (init always takes the whole
    path, which creates the head's params)."""
    if loss_targets is None:
        return {"logits": _vocab_constraint(logits_fn(head_in_BLD))}
    targets_BL, weights_BL = loss_targets
    batch, length = head_in_BLD.shape[:2]
    for name, x in (("targets", targets_BL), ("weights", weights_BL)):
        if x.shape != (batch, length):
            raise ValueError(
                f"loss_targets {name} have shape {x.shape}; expected the scored "
                f"positions' [B, L] = {(batch, length)}"
            )
    chunk_len = positions_per_chunk(
        batch, length, cfg.vocab_size, cfg.max_logits_elements
    )
    if chunk_len < length and not initializing:
        # A whole head gradient per device is allowed as much memory as logits.
        _, sums = chunked_loss.chunked_cross_entropy(
            head_in_BLD, logits_fn, targets_BL, weights_BL, chunk_len,
            max_local_head_elements=cfg.max_logits_elements,
        )  # fmt: skip
        return {"loss_sums": sums}
    logits_BLV = _vocab_constraint(logits_fn(head_in_BLD))
    _, sums = objectives.weighted_cross_entropy(logits_BLV, targets_BL, weights_BL)
    return {"logits": logits_BLV, "loss_sums": sums}


def _vocab_constraint(logits_BLV: Array) -> Array:
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "vocab"))


class TextEncoder(nn.Module):
    """BERT: embeddings + LayerNorm, post-LN blocks, MLM head tied to the embeddings.

    Returns {"hidden": [B,L,D] last block output, "logits": [B,L,V] MLM logits},
    both float32; no "logits" when `config.mlm_head` is False (no head params).
    With `config.num_classes` > 0 also "class_logits" [B,N] f32 from the pooled
    hidden states (`fmjax.models.heads`). With `loss_targets` also "loss_sums"
    (see `_head_outputs`: above `config.max_logits_elements` the MLM loss is
    computed in chunks and "logits" is left out).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        tokens_BL: Array,
        *,
        segment_ids_BL: Array | None = None,
        positions_BL: Array | None = None,
        type_ids_BL: Array | None = None,
        predict_positions_BK: Array | None = None,
        prompt_TD: Array | None = None,
        prefix_kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
        loss_targets: tuple[Array, Array] | None = None,
    ) -> dict[str, Array]:
        """`predict_positions_BK`: score only these positions ([B,K,V] logits).

        `prompt_TD`, `prefix_kv`: prompt / prefix tuning (module docstring).
        `loss_targets`: (targets, weights) of the scored positions ([B,K] with
        `predict_positions_BK`, else [B,L]) for the MLM loss's "loss_sums".
        """
        cfg = self.config
        segment_ids_BL, positions_BL = _default_inputs(
            tokens_BL, segment_ids_BL, positions_BL, cfg.max_len
        )
        num_prompt, num_prefix = _check_adapter_inputs(cfg, prompt_TD, prefix_kv)
        if type_ids_BL is None:
            type_ids_BL = jnp.zeros_like(tokens_BL)
        token_embed, x_BLD = _embed_tokens(cfg, tokens_BL, positions_BL)
        type_embed = _embed(
            cfg, cfg.type_vocab_size, ("type_vocab", "embed"), "type_embed"
        )
        x_BLD = x_BLD + type_embed(type_ids_BL)
        # S = T + L below: the soft tokens, if any, then the text.
        x_BSD = _prepend_prompt(x_BLD, prompt_TD)
        norm = dict(epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype)
        x_BSD = LayerNorm(name="embed_norm", **norm)(x_BSD)
        x_BSD = nn.Dropout(cfg.dropout_rate)(x_BSD, deterministic=deterministic)
        x_BSD = nn.with_logical_constraint(x_BSD, ("batch", "length", "embed"))

        mask_B1ST, positions_BS = _adapted_mask_and_positions(
            segment_ids_BL, positions_BL, num_prompt, num_prefix, causal=False
        )
        for i in range(cfg.num_layers):
            x_BSD, _ = block_class(cfg)(cfg, pre_norm=False, name=f"layers_{i}")(
                x_BSD,
                mask_B1ST,
                positions_BS,
                _layer_prefix(prefix_kv, i),
                deterministic,
            )
        hidden_BLD = x_BSD[:, num_prompt:]
        out = {"hidden": hidden_BLD}
        if cfg.num_classes:
            out["class_logits"] = classifier_logits(
                cfg, hidden_BLD, segment_ids_BL, deterministic
            )
        if not cfg.mlm_head:
            return out
        head_in_BLD = hidden_BLD
        if predict_positions_BK is not None:
            head_in_BLD = jnp.take_along_axis(
                hidden_BLD, predict_positions_BK[..., None], axis=1
            )

        # The head's transform is a D->D hidden layer; F names its output here.
        transform = EinsumDense(
            "BLD,DF->BLF",
            (cfg.d_model, cfg.d_model),
            ("embed", "mlp"),
            init_std=cfg.init_std,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            name="mlm_transform",
        )
        transform_norm = LayerNorm(name="mlm_norm", **norm)
        vocab_bias = self.param(
            "mlm_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            (cfg.vocab_size,),
            cfg.params_dtype,
        )

        def logits_fn(h_BLD):
            h_BLF = activation_fn(cfg.activation)(transform(h_BLD))
            logits_BLV = token_embed.attend(transform_norm(h_BLF), cfg.compute_dtype)
            return logits_BLV + vocab_bias.astype(jnp.float32)[None, None]

        head = _head_outputs(
            cfg, logits_fn, head_in_BLD, loss_targets, self.is_initializing()
        )
        return {**out, **head}


class TextDecoder(nn.Module):
    """GPT: token (+ learned position) embeddings, pre-LN blocks, final LayerNorm,
    LM head tied to the token embeddings unless `config.tie_embeddings` is False.

    Returns {"hidden": [B,L,D] after the final norm, "logits": [B,L,V]}, float32.
    With `loss_targets` = (targets_BL, weights_BL) (`objectives.next_token_targets`)
    also "loss_sums"; above `config.max_logits_elements` logits per device these
    come from chunks and "logits" is left out (`_head_outputs`).

    Decoding (`fmjax.inference.generate`) passes `cache`, one layer cache per
    layer (`init_cache`), with `positions_BL` and the attention mask
    `mask_B1LS` [B, 1, T+L, S] that the caller builds over the S cache slots
    (prefix slots first; segment ids are not read); the output then holds
    the updated "cache". `last_only` computes hidden states and logits for the
    last position only ([B,1,...]), all a sampler needs after a prefill;
    `select_BK` for the K positions of each row it lists ([B,K,...]), all a
    scorer needs: the last layer's queries, attention output and MLP, the
    final norm and the LM head see those positions only (every position still
    gives the last layer its keys and values).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        tokens_BL: Array,
        *,
        segment_ids_BL: Array | None = None,
        positions_BL: Array | None = None,
        prompt_TD: Array | None = None,
        prefix_kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
        cache: list[dict[str, Array]] | None = None,
        mask_B1LS: Array | None = None,
        last_only: bool = False,
        select_BK: Array | None = None,
        loss_targets: tuple[Array, Array] | None = None,
    ) -> dict[str, Array]:
        """`prompt_TD`, `prefix_kv`: prompt / prefix tuning (module docstring)."""
        cfg = self.config
        if loss_targets is not None and (
            cache is not None or last_only or select_BK is not None
        ):
            raise ValueError(
                "loss_targets scores every position of a training batch; expected "
                "no cache, last_only or select_BK with it"
            )
        if cfg.num_classes:
            raise ValueError(
                f"TextDecoder has no classifier head (num_classes={cfg.num_classes}); "
                "classify with an encoder (model.kind='encoder')"
            )
        num_prompt, num_prefix = _check_adapter_inputs(cfg, prompt_TD, prefix_kv)
        if cache is None:
            segment_ids_BL, positions_BL = _default_inputs(
                tokens_BL, segment_ids_BL, positions_BL, cfg.max_len
            )
            mask_B1ST, positions_BS = _adapted_mask_and_positions(
                segment_ids_BL, positions_BL, num_prompt, num_prefix, causal=True
            )
            caches = [None] * cfg.num_layers
        else:
            positions_BS, mask_B1ST = _cached_inputs(
                cfg, tokens_BL, positions_BL, mask_B1LS, cache, num_prompt
            )
            caches = list(cache)
        token_embed, x_BLD = _embed_tokens(cfg, tokens_BL, positions_BS[:, num_prompt:])
        # S = T + L below: the soft tokens, if any, then the text.
        x_BSD = _prepend_prompt(x_BLD, prompt_TD)
        x_BSD = nn.Dropout(cfg.dropout_rate)(x_BSD, deterministic=deterministic)
        x_BSD = nn.with_logical_constraint(x_BSD, ("batch", "length", "embed"))

        # The last layer gives outputs only where they are read (`Block`).
        batch, length = x_BSD.shape[:2]
        outputs_at_BK = None
        if last_only:
            outputs_at_BK = jnp.full((batch, 1), length - 1, jnp.int32)
        elif select_BK is not None:
            outputs_at_BK = select_BK.astype(jnp.int32) + num_prompt
        for i in range(cfg.num_layers):
            x_BSD, caches[i] = block_class(cfg)(
                cfg,
                pre_norm=True,
                residual_init_std=residual_init_std(cfg),
                name=f"layers_{i}",
            )(
                x_BSD,
                mask_B1ST,
                positions_BS,
                _layer_prefix(prefix_kv, i),
                deterministic,
                caches[i],
                outputs_at_BK if i == cfg.num_layers - 1 else None,
            )
        x_BLD = x_BSD if outputs_at_BK is not None else x_BSD[:, num_prompt:]
        hidden_BLD = LayerNorm(
            epsilon=cfg.layer_norm_eps, param_dtype=cfg.params_dtype, name="final_norm"
        )(x_BLD)

        if cfg.tie_embeddings:

            def logits_fn(h_BLD):
                return token_embed.attend(h_BLD, cfg.compute_dtype)

        else:
            lm_head = EinsumDense(
                "BLD,DV->BLV",
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                use_bias=False,
                init_std=cfg.init_std,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                name="lm_head",
            )

            def logits_fn(h_BLD):
                return lm_head(h_BLD).astype(jnp.float32)

        head = _head_outputs(
            cfg, logits_fn, hidden_BLD, loss_targets, self.is_initializing()
        )
        out = {"hidden": hidden_BLD, **head}
        if cache is not None:
            out["cache"] = caches
        return out


def decoding_head(cfg: TransformerConfig, params) -> Array | None:
    """The decoder's output head as one [D, V] matrix in the compute dtype, made
    once so that each decoding step computes its logits as `hidden @ head`;
    None where the model's own head serves as well (an untied kernel already
    in the compute dtype) or must run (an NF4 table or kernel). On XLA:CPU the
    tied head's [V, D] embedding table was re-packed for the matmul at every
    step (`gpt_lm:small` at batch 8: 551 us a traced step, 328 on the copy).
    The copy costs V*D more memory, so decoding makes it on CPU only
    (`fmjax.inference.generate.Generator`)."""
    if cfg.tie_embeddings:
        table_VD = params["token_embed"]["embedding"]
        return None if is_quantized(table_VD) else table_VD.T.astype(cfg.compute_dtype)
    kernel_DV = params["lm_head"]["kernel"]
    if is_quantized(kernel_DV) or kernel_DV.dtype == cfg.compute_dtype:
        return None
    return kernel_DV.astype(cfg.compute_dtype)


def _cached_inputs(cfg, tokens_BL, positions_BL, mask_B1LS, cache, num_prompt):
    """Positions [B, T+L] (soft tokens at 0) and the caller's mask, checked."""
    if positions_BL is None or mask_B1LS is None:
        raise ValueError("decoding with a cache needs positions_BL and mask_B1LS")
    if len(cache) != cfg.num_layers:
        raise ValueError(
            f"cache has {len(cache)} layers; expected num_layers={cfg.num_layers}"
        )
    if positions_BL.shape != tokens_BL.shape:
        raise ValueError(
            f"positions_BL has shape {positions_BL.shape}; expected tokens' shape "
            f"{tokens_BL.shape}"
        )
    batch, length = tokens_BL.shape
    if mask_B1LS.ndim != 4 or mask_B1LS.shape[:3] != (batch, 1, num_prompt + length):
        raise ValueError(
            f"mask_B1LS has shape {mask_B1LS.shape}; expected "
            f"[{batch}, 1, {num_prompt + length}, prefix slots + cache slots]"
        )
    soft_BT = jnp.zeros((batch, num_prompt), positions_BL.dtype)
    return jnp.concatenate([soft_BT, positions_BL], axis=1), mask_B1LS
