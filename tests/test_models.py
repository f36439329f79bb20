"""Model tests: shapes, masking invariants, NumPy references, partitioning, sizes."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_text_params, perturb

from fmjax.config import load_config
from fmjax.models import build_model
from fmjax.models.attention import apply_rope, make_attention_mask
from fmjax.models.axes import kernel_num_in
from fmjax.models.config import TransformerConfig
from fmjax.models.layers import Attention, Block, activation_fn
from fmjax.models.text import TextDecoder, TextEncoder, count_params

TINY = dict(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64
)
ENC_CFG = TransformerConfig(**TINY, max_len=32)
DEC_CFG = TransformerConfig(
    **TINY, max_len=32, layer_norm_eps=1e-5, activation="gelu_tanh"
)
LOGICAL_NAMES = {"vocab", "type_vocab", "length", "embed", "heads", "kv", "mlp"}


@pytest.fixture(scope="module")
def encoder():
    model = TextEncoder(ENC_CFG)
    apply = jax.jit(lambda p, t, **kw: model.apply({"params": p}, t, **kw))
    return init_text_params(model), apply


@pytest.fixture(scope="module")
def decoder():
    model = TextDecoder(DEC_CFG)
    apply = jax.jit(lambda p, t, **kw: model.apply({"params": p}, t, **kw))
    return init_text_params(model), apply


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY["vocab_size"])


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_kv_heads", 3),
        ("position", "alibi"),
        ("activation", "relu"),
        ("dtype", "int8"),
        ("vocab_size", 0),
        ("dropout_rate", 1.5),
    ],
)
def test_config_rejects_bad_value_naming_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        TransformerConfig(**{**TINY, field: value})
    assert repr(value) in str(info.value)


def test_config_from_dict_rejects_unknown_key_and_roundtrips():
    with pytest.raises(ValueError, match="hidden_size"):
        TransformerConfig.from_dict({**TINY, "hidden_size": 3})
    assert TransformerConfig.from_dict(DEC_CFG.to_dict()) == DEC_CFG
    with pytest.raises(ValueError, match="kind='vit'"):
        TransformerConfig(**TINY, kind="vit")
    with pytest.raises(ValueError, match="model.kind='clip'"):
        build_model({**TINY, "kind": "clip"})
    with pytest.raises(ValueError, match="unknown keys.*vocab_size"):
        build_model({**TINY, "kind": "vit"})  # a text config is no ViT's
    assert isinstance(build_model({**TINY, "kind": "decoder"}), TextDecoder)


@pytest.mark.parametrize(
    "names, num_in",
    [
        (("embed", "heads", "kv"), 1),  # query/key/value
        (("heads", "kv", "embed"), 2),  # attention out
        (("embed", "mlp"), 1),
        (("mlp", "embed"), 1),
        (("embed", "vocab"), 1),
    ],
)
def test_kernel_inputs_come_from_logical_axes(names, num_in):
    assert kernel_num_in(names) == num_in
    with pytest.raises(ValueError, match="split the head axes"):
        kernel_num_in(("heads", "embed", "kv"))


def test_attention_mask_segments_padding_and_causality():
    seg = jnp.array([[1, 1, 2, 0]])
    want = np.array(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=bool
    )
    mask = make_attention_mask(seg, causal=False)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], want)
    np.testing.assert_array_equal(
        make_attention_mask(seg, causal=True)[0, 0], want & np.tri(4, dtype=bool)
    )


# ------------------------------------------------------- shapes / invariants


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_output_shapes_and_dtypes(which, request):
    params, apply = request.getfixturevalue(which)
    out = apply(params, _tokens(0, (2, 12)))
    assert out["hidden"].shape == (2, 12, 32) and out["hidden"].dtype == jnp.float32
    assert out["logits"].shape == (2, 12, 61) and out["logits"].dtype == jnp.float32
    assert np.isfinite(out["logits"]).all()


def test_decoder_is_causal(decoder):
    params, apply = decoder
    tokens = _tokens(0, (2, 12))
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY["vocab_size"])
    before, after = apply(params, tokens)["logits"], apply(params, changed)["logits"]
    np.testing.assert_array_equal(before[:, :6], after[:, :6])
    moved = np.abs(np.asarray(before - after)[:, 6:]).max(axis=-1)
    assert (moved > 1e-4).all(), moved


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_packed_segments_match_running_each_alone(which, request):
    params, apply = request.getfixturevalue(which)
    a, b = _tokens(1, (1, 5)), _tokens(2, (1, 7))
    packed = apply(
        params,
        jnp.concatenate([a, b], axis=1),
        segment_ids_BL=jnp.array([[1] * 5 + [2] * 7]),
        positions_BL=jnp.array([list(range(5)) + list(range(7))]),
    )
    for alone, span in (
        (apply(params, a), slice(0, 5)),
        (apply(params, b), slice(5, 12)),
    ):
        for key in ("hidden", "logits"):
            np.testing.assert_allclose(
                packed[key][:, span], alone[key], atol=2e-5, rtol=2e-5
            )


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_padding_does_not_change_real_tokens(which, request):
    params, apply = request.getfixturevalue(which)
    real = _tokens(3, (1, 7))
    padded = jnp.concatenate([real, _tokens(4, (1, 5))], axis=1)
    seg = jnp.array([[1] * 7 + [0] * 5])
    out_padded = apply(params, padded, segment_ids_BL=seg)
    out_real = apply(params, real)
    for key in ("hidden", "logits"):
        assert np.isfinite(out_padded[key]).all()
        np.testing.assert_allclose(
            out_padded[key][:, :7], out_real[key], atol=2e-5, rtol=2e-5
        )


def test_bf16_compute_keeps_f32_params_and_outputs(encoder):
    params, apply_f32 = encoder
    cfg = TransformerConfig(**{**ENC_CFG.to_dict(), "dtype": "bfloat16"})
    model = TextEncoder(cfg)
    init_dtypes = {x.dtype for x in jax.tree.leaves(init_text_params(model))}
    assert init_dtypes == {jnp.dtype(jnp.float32)}
    tokens = _tokens(0, (2, 12))
    out = model.apply({"params": params}, tokens)
    ref = apply_f32(params, tokens)
    assert out["logits"].dtype == jnp.float32 and out["hidden"].dtype == jnp.float32
    err = np.abs(np.asarray(out["hidden"] - ref["hidden"])).max()
    assert 0 < err < 0.1, err  # nonzero: the matmuls really ran in bf16


def test_dropout_only_when_not_deterministic():
    cfg = TransformerConfig(**{**DEC_CFG.to_dict(), "dropout_rate": 0.2})
    model = TextDecoder(cfg)
    params, tokens = init_text_params(model), _tokens(0, (2, 12))

    def run(seed, deterministic):
        rngs = {"dropout": jax.random.key(seed)}
        kw = dict(deterministic=deterministic, rngs=rngs)
        return model.apply({"params": params}, tokens, **kw)["logits"]

    np.testing.assert_array_equal(run(0, True), run(1, True))
    assert not np.allclose(run(0, False), run(1, False))


# ------------------------------------------------------- NumPy references


def _np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x, tanh):
    if tanh:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def test_activations_and_their_gradients_match_numpy():
    """Each activation against a float64 NumPy reference, values and
    derivatives; "gelu" (erf) and "gelu_erfc" (jax.nn.gelu) are one function."""
    x = np.linspace(-9, 9, 2001)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    pdf = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    sig = 1 / (1 + np.exp(-1.702 * x))
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    references = {
        "gelu": (x * cdf, cdf + x * pdf),
        "gelu_erfc": (x * cdf, cdf + x * pdf),
        "gelu_tanh": (
            _np_gelu(x, tanh=True),
            0.5 * (1 + t)
            + 0.5 * x * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2),
        ),
        "quick_gelu": (x * sig, sig + 1.702 * x * sig * (1 - sig)),
    }
    x32 = jnp.asarray(x, jnp.float32)
    for name, (value, derivative) in references.items():
        fn = activation_fn(name)
        np.testing.assert_allclose(fn(x32), value, atol=1e-5, err_msg=name)
        grad = jax.vmap(jax.grad(fn))(x32)
        np.testing.assert_allclose(grad, derivative, atol=1e-5, err_msg=name)


def _np_rope(x_LHK, pos_L, theta):
    half = x_LHK.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half) * 2.0 / x_LHK.shape[-1])
    ang = pos_L[:, None, None] * inv_freq[None, None, :]
    x1, x2 = x_LHK[..., :half], x_LHK[..., half:]
    return np.concatenate(
        [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
    )


def _np_attention(x_LD, p, mask_LL, cfg, pos_L):
    def proj(name):
        return np.einsum("ld,dhk->lhk", x_LD, p[name]["kernel"]) + p[name]["bias"]

    q, k, v = proj("query"), proj("key"), proj("value")
    if cfg.position == "rope":
        q, k = _np_rope(q, pos_L, cfg.rope_theta), _np_rope(k, pos_L, cfg.rope_theta)
    group = cfg.num_heads // cfg.kv_heads  # kv head j serves query heads j*G..j*G+G-1
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("lhk,shk->hls", q, k) / np.sqrt(cfg.head_dim)
    # Finite: padding rows mask every key; those rows are not compared.
    scores = np.where(mask_LL[None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("hls,shk->lhk", probs, v)
    return np.einsum("lhk,hkd->ld", ctx, p["out"]["kernel"]) + p["out"]["bias"]


def _np_mlp(x_LD, p, cfg):
    h = x_LD @ p["up"]["kernel"] + p["up"]["bias"]
    h = _np_gelu(h, cfg.activation == "gelu_tanh")
    return h @ p["down"]["kernel"] + p["down"]["bias"]


def _np_block(x_LD, p, mask_LL, cfg, pos_L, pre_norm):
    eps = cfg.layer_norm_eps
    attn = lambda h: _np_attention(h, p["attention"], mask_LL, cfg, pos_L)
    mlp = lambda h: _np_mlp(h, p["mlp"], cfg)
    if pre_norm:
        x_LD = x_LD + attn(_np_layer_norm(x_LD, p["attention_norm"], eps))
        return x_LD + mlp(_np_layer_norm(x_LD, p["mlp_norm"], eps))
    x_LD = _np_layer_norm(x_LD + attn(x_LD), p["attention_norm"], eps)
    return _np_layer_norm(x_LD + mlp(x_LD), p["mlp_norm"], eps)


@pytest.mark.parametrize(
    "cfg,pre_norm,causal",
    [
        (ENC_CFG, False, False),  # BERT block: post-LN, exact GELU, MHA
        (  # GPT-style block with RoPE and grouped-query attention
            TransformerConfig(
                **{**DEC_CFG.to_dict(), "position": "rope", "num_kv_heads": 2}
            ),
            True,
            True,
        ),
    ],
    ids=["post_ln_encoder", "pre_ln_decoder_rope_gqa"],
)
def test_block_matches_numpy(cfg, pre_norm, causal):
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 0, 0], list(range(8))])
    x = jax.random.normal(jax.random.key(5), (2, 8, cfg.d_model))
    mask = make_attention_mask(seg, causal=causal)
    block = Block(cfg, pre_norm=pre_norm)
    params = perturb(nn.unbox(block.init(jax.random.key(0), x, mask, pos)["params"]))
    got = np.asarray(block.apply({"params": params}, x, mask, pos)[0])
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    for b in range(2):
        real = np.asarray(seg[b]) != 0
        want = _np_block(
            np.asarray(x[b], np.float64),
            p64,
            np.asarray(mask[b, 0]),
            cfg,
            np.asarray(pos[b], np.float64),
            pre_norm,
        )
        np.testing.assert_allclose(got[b][real], want[real], atol=1e-5, rtol=1e-5)


def test_encoder_mlm_head_is_tied_to_token_embedding(encoder):
    params, apply = encoder
    out = apply(params, _tokens(0, (2, 12)))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(out["hidden"], np.float64)
    h = _np_gelu(h @ p["mlm_transform"]["kernel"] + p["mlm_transform"]["bias"], False)
    h = _np_layer_norm(h, p["mlm_norm"], ENC_CFG.layer_norm_eps)
    want = h @ p["token_embed"]["embedding"].T + p["mlm_bias"]
    np.testing.assert_allclose(out["logits"], want, atol=1e-4, rtol=1e-4)


def test_encoder_without_mlm_head_has_no_head_params_and_same_hidden(encoder):
    params, apply = encoder
    model = TextEncoder(dataclasses.replace(ENC_CFG, mlm_head=False))
    tokens = _tokens(0, (2, 12))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    head = {"mlm_transform", "mlm_norm", "mlm_bias"}
    assert set(shapes) == set(params) - head and head <= set(params)
    body = {k: v for k, v in params.items() if k not in head}
    out = model.apply({"params": body}, tokens)
    assert set(out) == {"hidden"}
    np.testing.assert_allclose(
        out["hidden"], apply(params, tokens)["hidden"], atol=1e-6
    )


def test_decoder_head_tied_or_separate(decoder):
    params, apply = decoder
    out = apply(params, _tokens(0, (2, 12)))
    want = np.asarray(out["hidden"]) @ np.asarray(params["token_embed"]["embedding"]).T
    np.testing.assert_allclose(out["logits"], want, atol=1e-4, rtol=1e-4)

    untied = TextDecoder(
        TransformerConfig(**{**DEC_CFG.to_dict(), "tie_embeddings": False})
    )
    p2 = init_text_params(untied)
    assert p2["lm_head"]["kernel"].shape == (32, 61) and "bias" not in p2["lm_head"]
    out2 = untied.apply({"params": p2}, _tokens(0, (2, 12)))
    want2 = np.asarray(out2["hidden"]) @ np.asarray(p2["lm_head"]["kernel"])
    np.testing.assert_allclose(out2["logits"], want2, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ RoPE / GQA


def test_rope_scores_depend_only_on_offset():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(pos_q, pos_k):
        rq = apply_rope(q, jnp.array([[pos_q]]), 10000.0)
        rk = apply_rope(k, jnp.array([[pos_k]]), 10000.0)
        return float(jnp.sum(rq * rk))

    for offset in (0, 1, 5):
        scores = [score(p + offset, p) for p in (0, 3, 17, 100)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(1, 0) - score(5, 0)) > 1e-3  # the offset does matter
    np.testing.assert_allclose(apply_rope(q, jnp.zeros((1, 1)), 1e4), q, atol=1e-6)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, jnp.array([[7]]), 1e4)), jnp.linalg.norm(q)
    )


def test_gqa_equals_mha_with_repeated_kv_heads():
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    mask = make_attention_mask(jnp.ones((2, 6), jnp.int32), causal=True)
    gqa = Attention(num_heads=4, head_dim=8, num_kv_heads=2)
    params = perturb(nn.unbox(gqa.init(jax.random.key(1), x, mask)["params"]))
    assert params["key"]["kernel"].shape == (32, 2, 8)
    mha_params = dict(params)
    for name in ("key", "value"):
        mha_params[name] = {
            "kernel": jnp.repeat(params[name]["kernel"], 2, axis=1),
            "bias": jnp.repeat(params[name]["bias"], 2, axis=0),
        }
    mha = Attention(num_heads=4, head_dim=8)
    np.testing.assert_allclose(
        gqa.apply({"params": params}, x, mask)[0],
        mha.apply({"params": mha_params}, x, mask)[0],
        atol=1e-5,
        rtol=1e-5,
    )


# --------------------------------------------------- partitioning / sizes


@pytest.mark.parametrize(
    "model",
    [
        TextEncoder(ENC_CFG),
        TextDecoder(DEC_CFG),
        TextDecoder(
            TransformerConfig(
                **{**DEC_CFG.to_dict(), "position": "rope", "tie_embeddings": False}
            )
        ),
    ],
    ids=["encoder", "decoder", "decoder_rope_untied"],
)
def test_every_param_has_one_logical_name_per_dim(model):
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    boxes = jax.tree.leaves(
        variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )
    assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
    for box in boxes:
        assert len(box.names) == box.value.ndim, box
        assert set(box.names) <= LOGICAL_NAMES, box.names
    specs = jax.tree.leaves(
        nn.get_partition_spec(variables),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    assert [len(s) for s in specs] == [b.value.ndim for b in boxes]


def _abstract_count(config_spec, **overrides):
    """Params of a config file's model (the presets live in configs/)."""
    model = build_model({**load_config(config_spec).model, **overrides})
    tokens = jnp.zeros((1, 8), jnp.int32)
    return count_params(jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)))


def test_bert_base_matches_hf_bert_for_masked_lm():
    # HF BertModel (with pooler) has 109,482,240 params. BertForMaskedLM drops
    # the pooler (768*768 + 768) and adds the MLM transform (768*768 + 768),
    # its LayerNorm (2*768) and the vocab bias (30522); the decoder matrix is
    # tied to the word embeddings. Total 109,514,298, HF's own count for
    # bert-base-uncased BertForMaskedLM.
    d, v = 768, 30522
    want = 109_482_240 - (d * d + d) + (d * d + d) + 2 * d + v
    assert want == 109_514_298
    assert load_config("configs/bert_mlm.py:base").model.vocab_size == v
    assert _abstract_count("configs/bert_mlm.py:base") == want


def test_gpt2_124m_matches_hf_gpt2():
    assert _abstract_count("configs/gpt_lm.py:base") == 124_439_808
    untied = _abstract_count("configs/gpt_lm.py:base", tie_embeddings=False)
    assert untied == 124_439_808 + 768 * 50257
