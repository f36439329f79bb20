"""Chunked computations equal the whole ones: the LM head + cross-entropy in
chunks of positions (`fmjax.chunked_loss`: the [B, L, V] logits never whole)
and attention in chunks of queries (`fmjax.models.attention.chunked_attention`),
values and gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_text_params

from fmjax.models.config import TransformerConfig
from fmjax.models.text import TextDecoder, TextEncoder

# B=2 rows of L=16 over V=50: `max_logits_elements` = room for 5 positions
# makes chunks of 4 (the MLM's 7 scored positions: 2 chunks, one padded).
CHUNK_TINY = dict(
    vocab_size=50, d_model=8, num_layers=1, num_heads=2, head_dim=4, mlp_dim=16
)


@pytest.mark.parametrize(
    "kind,tie", [("decoder", True), ("decoder", False), ("encoder", True)]
)
def test_chunked_head_loss_equals_whole_logits_loss_and_grads(kind, tie):
    from fmjax import objectives

    B, L, V = 2, 16, 50
    whole_cfg = TransformerConfig(
        **CHUNK_TINY, max_len=L, kind=kind, tie_embeddings=tie, max_logits_elements=0
    )
    chunked_cfg = dataclasses.replace(whole_cfg, max_logits_elements=B * 5 * V)
    module = TextDecoder if kind == "decoder" else TextEncoder
    # perturbed: the MLM bias is not zero
    params = init_text_params(module(whole_cfg), L)
    tokens_BL = jax.random.randint(jax.random.key(3), (B, L), 0, V)
    if kind == "decoder":
        # Two packed documents and padding; the loss mask drops a prompt.
        segment_ids_BL = jnp.asarray([[1] * 10 + [2] * 6, [1] * 13 + [0] * 3])
        loss_mask_BL = jnp.asarray([[0] * 4 + [1] * 12, [1] * L])
        targets, weights = objectives.next_token_targets(
            tokens_BL, segment_ids_BL, loss_mask_BL
        )
        inputs = dict(segment_ids_BL=segment_ids_BL)
        reference = functools.partial(
            objectives.next_token_loss,
            tokens_BL=tokens_BL,
            segment_ids_BL=segment_ids_BL,
            loss_mask_BL=loss_mask_BL,
        )
    else:
        positions_BK = jnp.asarray([[1, 3, 4, 8, 9, 12, 15], [0, 2, 5, 6, 7, 10, 11]])
        targets = jax.random.randint(jax.random.key(4), positions_BK.shape, 0, V)
        weights = jnp.asarray([[1.0] * 7, [1.0] * 5 + [0.0] * 2])
        inputs = dict(predict_positions_BK=positions_BK)
        reference = functools.partial(
            objectives.mlm_loss, targets_BL=targets, weights_BL=weights
        )

    def loss(model, params):
        out = model.apply(
            {"params": params}, tokens_BL, loss_targets=(targets, weights), **inputs
        )
        sums = out["loss_sums"]
        return sums["loss_sum"] / sums["count"], (sums, out.get("logits"))

    def run(cfg):
        fn = functools.partial(loss, module(cfg))
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (want_loss, (want, logits)), want_grads = run(whole_cfg)
    (got_loss, (got, no_logits)), got_grads = run(chunked_cfg)
    assert logits.shape[-1] == V and no_logits is None
    # Whole logits: the same sums as the objective on the model's logits.
    _, before = reference(logits)
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(want[key], before[key], rtol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-5)
    assert float(got["correct"]) == float(want["correct"])
    assert float(got["count"]) == float(want["count"]) > 0
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, grad in jax.tree_util.tree_leaves_with_path(got_grads):
        np.testing.assert_allclose(
            grad, flat_want[path], rtol=1e-5, atol=1e-5, err_msg=str(path)
        )


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_chunked_attention_equals_whole_attention_and_grads(kind):
    """Queries in chunks of 4 (the scores of 2 rows x 2 heads x 4 queries x 19
    keys fit `max_attention_elements`): GQA, RoPE, packed segments, padding,
    15 queries (one chunk padded) and, in the decoder, 4 prefix-tuning slots."""
    B, L, T = 2, 15, 4
    cfg = TransformerConfig(
        **{**CHUNK_TINY, "num_kv_heads": 1},
        max_len=16,
        kind=kind,
        position="rope",
        max_attention_elements=0,
    )
    keys = L + T if kind == "decoder" else L
    chunked_cfg = dataclasses.replace(cfg, max_attention_elements=B * 2 * 5 * keys)
    module = TextDecoder if kind == "decoder" else TextEncoder
    params = init_text_params(module(cfg), L)
    tokens_BL = jax.random.randint(jax.random.key(3), (B, L), 0, 50)
    inputs = dict(segment_ids_BL=jnp.asarray([[1] * 9 + [2] * 6, [1] * 12 + [0] * 3]))
    if kind == "decoder":
        prefix = jax.random.normal(jax.random.key(4), (2, 1, T, 1, 4))
        inputs["prefix_kv"] = (prefix[0], prefix[1])

    def run(cfg):
        model = module(cfg)

        def loss(params):
            out = model.apply({"params": params}, tokens_BL, **inputs)
            return jnp.sum(jnp.sin(out["logits"])), out["logits"]

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, want_logits), want_grads = run(cfg)
    (_, logits), grads = run(chunked_cfg)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(
            grad, flat_want[path], rtol=1e-5, atol=1e-5, err_msg=str(path)
        )
