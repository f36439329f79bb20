"""Attention internals: queries at chosen positions only (a last layer whose
readout is one token), the chunked attention's memory, and fmjax's softmax."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, perturb

from fmjax.models.attention import make_attention_mask
from fmjax.models.config import TransformerConfig
from fmjax.models.layers import Block, take_rows
from fmjax.models.text import TextDecoder
from fmjax.models.vision import VisionTransformer, ViTConfig

TINY = dict(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64,
    max_len=32,
)  # fmt: skip


@pytest.mark.parametrize(
    "cfg,pre_norm,causal",
    [
        (TransformerConfig(**TINY), False, False),  # BERT's post-LN block
        (  # GPT-style: pre-LN, RoPE, grouped-query attention, causal
            TransformerConfig(**TINY, position="rope", num_kv_heads=2),
            True,
            True,
        ),
    ],
    ids=["post_ln", "pre_ln_rope_gqa_causal"],
)
def test_block_outputs_at_equal_the_full_blocks_rows_and_grads(cfg, pre_norm, causal):
    """A block asked for two positions per row (packed segments, padding, a
    repeated position) gives the full block's outputs there, and the same
    gradients for its params and its input."""
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 0, 0], list(range(8))])
    at = jnp.array([[2, 4], [7, 7]])
    x = jax.random.normal(jax.random.key(5), (2, 8, cfg.d_model))
    mask = make_attention_mask(seg, causal=causal)
    block = Block(cfg, pre_norm=pre_norm)
    params = perturb(nn.unbox(block.init(jax.random.key(0), x, mask, pos)["params"]))

    def loss(params, x, outputs_at):
        out, _ = block.apply(
            {"params": params}, x, mask, pos, None, True, None, outputs_at
        )
        rows = out if outputs_at is not None else take_rows(out, at)
        return jnp.sin(rows).sum(), rows

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (want_grads, want), (got_grads, got) = grad(params, x, None), grad(params, x, at)
    assert got.shape == (2, 2, cfg.d_model)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)


def test_decoder_last_only_and_select_equal_the_full_hidden_states():
    """`last_only` and `select_BK` (the last layer computes those positions
    only) equal the full run's hidden states and logits there, with soft
    prompt tokens in front (the positions count from the text)."""
    cfg = TransformerConfig(**TINY, kind="decoder", layer_norm_eps=1e-5)
    model = TextDecoder(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    prompt = jax.random.normal(jax.random.key(2), (3, cfg.d_model))
    params = perturb(nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    run = jax.jit(
        lambda **kw: model.apply({"params": params}, tokens, prompt_TD=prompt, **kw),
        static_argnames="last_only",
    )
    full = run()
    select = jnp.array([[0, 9, 4], [5, 5, 1]])
    picked = run(select_BK=select)
    for key in ("hidden", "logits"):
        np.testing.assert_allclose(
            picked[key], take_rows(full[key], select), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            run(last_only=True)[key], full[key][:, -1:], rtol=1e-5, atol=1e-5
        )


def test_vit_pooled_only_computes_cls_alone_with_the_same_readout():
    cfg = ViTConfig(
        image_size=16, patch_size=4, d_model=32, num_layers=2, num_heads=4,
        head_dim=8, mlp_dim=64, channels=3, pool="cls", pre_norm=True,
        num_classes=3,
    )  # fmt: skip
    model = VisionTransformer(cfg)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    params = perturb(nn.unbox(model.init(jax.random.key(0), images)["params"]))

    def loss(params, pooled_only):
        out = model.apply({"params": params}, images, pooled_only=pooled_only)
        return jnp.sin(out["logits"]).sum(), out

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (want_grads, want), (got_grads, got) = grad(params, False), grad(params, True)
    assert got["hidden"].shape == (2, 1, 32) and want["hidden"].shape == (2, 17, 32)
    for key in ("pooled", "logits"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def _largest_value(jaxpr) -> int:
    """Elements of the largest value a jaxpr (or one inside it) computes."""
    largest = 0
    for eqn in jaxpr.eqns:
        largest = max([largest, *(math.prod(v.aval.shape) for v in eqn.outvars)])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_value(inner))
    return largest


def test_chunked_attention_never_holds_all_scores():
    """Forward and backward of `chunked_attention` hold one chunk of the
    [B, H, L, S] scores at a time (a scan that saved every chunk's would hold
    them all)."""
    from fmjax.models.attention import (
        attend_values,
        attention_probs,
        chunked_attention,
    )

    B, L, H, K = 2, 16, 8, 2  # many heads: the scores outgrow q, k, v and the mask
    q, k, v = jax.random.normal(jax.random.key(0), (3, B, L, H, K))
    mask_B1LS = make_attention_mask(jnp.ones((B, L), jnp.int32), causal=True)
    layouts = ("BSGK", "BSGK")

    def whole(q, k, v):
        return attend_values(attention_probs(q, k, mask_B1LS), v).sum()

    def chunked(q, k, v):
        return chunked_attention(q, k, v, mask_B1LS, layouts, chunk_len=4).sum()

    grads = jax.grad(chunked, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(whole, argnums=(0, 1, 2))(q, k, v)
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    chunk = _largest_value(jax.make_jaxpr(jax.grad(chunked))(q, k, v).jaxpr)
    assert chunk == B * H * 4 * L  # one chunk of 4 queries' scores
    assert (
        _largest_value(jax.make_jaxpr(jax.grad(whole))(q, k, v).jaxpr) == B * H * L * L
    )


def test_attention_softmax_matches_jax_and_saves_only_its_output():
    """fmjax's attention softmax: the values and first and second derivatives
    of `jax.nn.softmax`, including a row where every key is masked; its
    backward pass keeps only the output, where `jax.nn.softmax` without JAX's
    custom-jvp flag keeps the exponentials and their sums."""
    from fmjax.models.attention import _MASKED_SCORE, softmax

    x = jax.random.normal(jax.random.key(0), (3, 5, 7)) * 4
    x = x.at[1, 2].set(_MASKED_SCORE)  # a padding row: every key masked
    weights = jax.random.normal(jax.random.key(1), x.shape)

    def loss(f):
        return lambda x: (f(x) * weights).sum() + (f(x) ** 2).sum()

    reference = functools.partial(jax.nn.softmax, axis=-1)
    np.testing.assert_allclose(softmax(x), reference(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        jax.grad(loss(softmax))(x), jax.grad(loss(reference))(x), rtol=1e-5, atol=1e-6
    )
    direction = jax.random.normal(jax.random.key(2), x.shape)
    hvp = lambda f: jax.jvp(jax.grad(loss(f)), (x,), (direction,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(softmax), hvp(reference), rtol=1e-4, atol=1e-5)

    def saved(f):  # what the backward pass keeps
        return jax.tree.leaves(jax.vjp(f, x)[1])

    (output,) = saved(softmax)
    np.testing.assert_array_equal(output, softmax(x))
    assert len(saved(reference)) > 1  # the exponentials and their sums
