"""Prompt and prefix tuning (fmjax.adapt.prompts and the models' adapter inputs)."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import perturb

from fmjax.adapt import prompts
from fmjax.models.attention import make_attention_mask
from fmjax.models.config import TransformerConfig
from fmjax.models.layers import Attention
from fmjax.models.text import TextDecoder, TextEncoder
from fmjax.train.state import TrainState

V, D, LAYERS, H, H_KV, K, F = 61, 32, 2, 4, 2, 8, 64
TINY = dict(
    vocab_size=V,
    d_model=D,
    num_layers=LAYERS,
    num_heads=H,
    num_kv_heads=H_KV,
    head_dim=K,
    mlp_dim=F,
    max_len=32,
)
ENC_CFG = TransformerConfig(**TINY)
# RoPE in the decoder: soft tokens and prefix keys must work without positions.
DEC_CFG = TransformerConfig(**TINY, position="rope", layer_norm_eps=1e-5)
N_PROMPT, P_PREFIX, B, L = 3, 4, 2, 8


def _adapter(method, params, cfg, seed=2):
    rng = jax.random.key(seed)
    if method == "prompt":
        return prompts.init_prompt(params, prompts.PromptConfig(N_PROMPT), rng)
    config = prompts.PrefixConfig(P_PREFIX, reparam_hidden=16)
    adapter = prompts.init_prefix(cfg, config, rng)
    # Prefix values at the model's init scale barely move the outputs; make
    # them large enough that a wrong mask or position shows in the tests.
    kv = prompts.prefix_kv(adapter, cfg)
    return {"key": 3.0 * kv[0], "value": 3.0 * kv[1]}


@pytest.fixture(scope="module")
def models():
    """{"encoder"/"decoder": (params, jitted fn(params, adapter, method, tokens,
    segment_ids, positions) -> outputs)}."""
    tokens_BL = jnp.zeros((B, L), jnp.int32)
    out = {}
    for name, cls, cfg in (
        ("encoder", TextEncoder, ENC_CFG),
        ("decoder", TextDecoder, DEC_CFG),
    ):
        model = cls(cfg)
        params = perturb(nn.unbox(model.init(jax.random.key(0), tokens_BL)["params"]))

        def call(
            params, adapter, tokens, segment_ids, positions, *, model, cfg, method
        ):
            kwargs = (
                {} if method is None else prompts.model_kwargs(method, adapter, cfg)
            )
            return model.apply(
                {"params": params},
                tokens,
                segment_ids_BL=segment_ids,
                positions_BL=positions,
                **kwargs,
            )

        fns = {
            method: jax.jit(
                lambda p, a, t, s, pos, method=method, model=model, cfg=cfg: call(
                    p, a, t, s, pos, model=model, cfg=cfg, method=method
                )
            )
            for method in (None, "prompt", "prefix")
        }
        out[name] = (params, cfg, fns)
    return out


def _tokens(seed=3, shape=(B, L)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _unpacked(tokens_BL):
    batch, length = tokens_BL.shape
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    return jnp.ones((batch, length), jnp.int32), positions


# --- shapes and effect -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_outputs_keep_text_shape_and_change(models, kind, method):
    params, cfg, fns = models[kind]
    adapter = _adapter(method, params, cfg)
    tokens = _tokens()
    base = fns[None](params, None, tokens, *_unpacked(tokens))
    adapted = fns[method](params, adapter, tokens, *_unpacked(tokens))
    assert adapted["hidden"].shape == (B, L, D)
    assert adapted["logits"].shape == (B, L, V)
    assert np.all(np.isfinite(adapted["logits"]))
    # Every text position is affected (the decoder's first token included).
    diff_BL = np.abs(adapted["hidden"] - base["hidden"]).max(-1)
    assert diff_BL.min() > 1e-4, diff_BL


# --- (a) prefix attention against NumPy ---------------------------------------


def _np_rope(x_LHK, positions_L, theta=10000.0):
    half = x_LHK.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half) * 2.0 / x_LHK.shape[-1])
    angles_L1k = positions_L[:, None, None] * inv_freq[None, None]
    x1, x2 = x_LHK[..., :half], x_LHK[..., half:]
    cos, sin = np.cos(angles_L1k), np.sin(angles_L1k)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_prefix_attention_matches_numpy_concatenated_kv():
    """GQA + RoPE attention with P prefix slots (unrotated), causal over the text,
    equals softmax attention over [prefix; text] keys/values in NumPy."""
    attention = Attention(num_heads=H, head_dim=K, num_kv_heads=H_KV, use_rope=True)
    x_BLD = jax.random.normal(jax.random.key(0), (B, L, D))
    k_TGK, v_TGK = jax.random.normal(jax.random.key(1), (2, P_PREFIX, H_KV, K))
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[1, 5:] = 0  # padding
    positions = np.broadcast_to(np.arange(L)[None], (B, L))
    mask = make_attention_mask(jnp.asarray(segment_ids), True, num_prefix=P_PREFIX)
    variables = attention.init(
        jax.random.key(2), x_BLD, mask, positions, prefix_kv=(k_TGK, v_TGK)
    )
    params = perturb(nn.unbox(variables["params"]))
    got, no_cache = attention.apply(
        {"params": params}, x_BLD, mask, positions, prefix_kv=(k_TGK, v_TGK)
    )
    assert no_cache is None

    p = jax.tree.map(np.asarray, params)
    x = np.asarray(x_BLD, np.float64)
    g = H // H_KV
    for b in range(B):
        q_LHK = (
            np.einsum("LD,DHK->LHK", x[b], p["query"]["kernel"]) + p["query"]["bias"]
        )
        k_LHK = np.einsum("LD,DHK->LHK", x[b], p["key"]["kernel"]) + p["key"]["bias"]
        v_LHK = (
            np.einsum("LD,DHK->LHK", x[b], p["value"]["kernel"]) + p["value"]["bias"]
        )
        q_LHK, k_LHK = _np_rope(q_LHK, positions[b]), _np_rope(k_LHK, positions[b])
        k_SHK = np.concatenate([np.asarray(k_TGK), k_LHK])
        v_SHK = np.concatenate([np.asarray(v_TGK), v_LHK])
        context_LHK = np.zeros((L, H, K))
        for i in range(L):
            if segment_ids[b, i] == 0:
                continue  # padding queries: outputs are unspecified
            visible = [True] * P_PREFIX + [
                j <= i and segment_ids[b, j] == 1 for j in range(L)
            ]
            for h in range(H):
                scores = k_SHK[:, h // g] @ q_LHK[i, h] / np.sqrt(K)
                scores = np.where(visible, scores, -np.inf)
                w = np.exp(scores - scores.max())
                context_LHK[i, h] = (w / w.sum()) @ v_SHK[:, h // g]
        want_LD = (
            np.einsum("LHK,HKD->LD", context_LHK, p["out"]["kernel"]) + p["out"]["bias"]
        )
        real = segment_ids[b] == 1
        np.testing.assert_allclose(got[b][real], want_LD[real], rtol=1e-4, atol=1e-4)


def test_attention_rejects_mask_without_prefix_columns():
    attention = Attention(num_heads=H, head_dim=K, num_kv_heads=H_KV)
    x_BLD = jnp.zeros((B, L, D))
    mask = jnp.ones((B, 1, L, L), bool)
    kv = jnp.zeros((P_PREFIX, H_KV, K))
    with pytest.raises(ValueError, match="expected 12"):
        attention.init(jax.random.key(0), x_BLD, mask, prefix_kv=(kv, kv))


# --- (b) training only the adapter ------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_training_adapter_leaves_base_bit_identical(models, method):
    """adamw with weight decay through the trainer's trained/frozen split: the
    adapter gets gradients and moves, the loss falls, base bits do not change
    (weight decay alone would change them if the base were trained)."""
    params, cfg, _ = models["decoder"]
    model = TextDecoder(cfg)
    if method == "prefix":  # the reparam MLP, as it will be trained
        adapter = prompts.init_prefix(
            cfg, prompts.PrefixConfig(P_PREFIX, reparam_hidden=16), jax.random.key(2)
        )
    else:
        adapter = _adapter(method, params, cfg)
    # The trainer's split: the adapter is trained, the base is `frozen`.
    tx = optax.adamw(3e-2, weight_decay=0.1)
    state = TrainState.create(adapter, tx, jax.random.key(0), frozen=params)
    tokens_BL = _tokens(seed=5, shape=(B, 12))

    def loss_fn(adapter, base):
        kwargs = prompts.model_kwargs(method, adapter, cfg)
        logits = model.apply({"params": base}, tokens_BL[:, :-1], **kwargs)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, tokens_BL[:, 1:]
        ).mean()

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen)
        return state.apply_gradients(grads), loss, grads

    losses = []
    start = {"adapter": state.params, "base": state.frozen}
    for _ in range(3):
        state, loss, grads = step(state)
        losses.append(float(loss))
        for path, g in flax.traverse_util.flatten_dict(grads, sep="/").items():
            assert float(jnp.abs(g).max()) > 0, f"zero gradient for adapter/{path}"
    tree = {"adapter": state.params, "base": state.frozen}
    final_loss = float(loss_fn(tree["adapter"], tree["base"]))
    assert final_loss < losses[0], (losses, final_loss)
    for a, b in zip(*(jax.tree.leaves(t["base"]) for t in (start, tree)), strict=True):
        np.testing.assert_array_equal(
            np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)
        )
    moved = [
        float(jnp.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(start["adapter"]),
            jax.tree.leaves(tree["adapter"]),
            strict=True,
        )
    ]
    assert min(moved) > 0, moved


# --- (c) decoder causality, packed rows -------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_decoder_causal_with_adapter(models, method):
    params, cfg, fns = models["decoder"]
    adapter = _adapter(method, params, cfg)
    tokens = _tokens()
    t = 4
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % V)
    before = fns[method](params, adapter, tokens, *_unpacked(tokens))["logits"]
    after = fns[method](params, adapter, changed, *_unpacked(changed))["logits"]
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    assert np.abs(before[:, t + 1 :] - after[:, t + 1 :]).max() > 1e-4


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_decoder_packed_row_equals_documents_alone(models, method):
    """In the decoder both adapters are exact for packed rows: each document of a
    packed row gets the logits it gets alone (positions restart at 0)."""
    params, cfg, fns = models["decoder"]
    adapter = _adapter(method, params, cfg)
    tokens = _tokens(seed=7, shape=(1, L))
    split = 3
    segment_ids = jnp.asarray([[1] * split + [2] * (L - split)])
    positions = jnp.asarray([list(range(split)) + list(range(L - split))])
    packed = fns[method](params, adapter, tokens, segment_ids, positions)["logits"]
    for doc in (tokens[:, :split], tokens[:, split:]):
        alone = fns[method](params, adapter, doc, *_unpacked(doc))["logits"]
        got = packed[:, :split] if doc.shape[1] == split else packed[:, split:]
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)


# --- (d) encoder padding ------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_encoder_padding_invariance_with_adapter(models, method):
    """A padded row gives the same outputs on its real tokens as the row alone, and
    the pad tokens' ids do not matter."""
    params, cfg, fns = models["encoder"]
    adapter = _adapter(method, params, cfg)
    real = 5
    tokens = _tokens(seed=11)
    segment_ids = jnp.asarray([[1] * L, [1] * real + [0] * (L - real)])
    positions = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
    padded = fns[method](params, adapter, tokens, segment_ids, positions)["hidden"]
    other_pad = tokens.at[1, real:].set((tokens[1, real:] + 7) % V)
    repadded = fns[method](params, adapter, other_pad, segment_ids, positions)["hidden"]
    np.testing.assert_allclose(padded[1, :real], repadded[1, :real], atol=1e-6)
    alone_tokens = tokens[1:, :real]
    alone = fns[method](params, adapter, alone_tokens, *_unpacked(alone_tokens))
    np.testing.assert_allclose(padded[1, :real], alone["hidden"][0], atol=1e-5)


# --- (e) prefix params ----------------------------------------------------------


def test_reparam_prefix_shapes_and_mlp():
    config = prompts.PrefixConfig(P_PREFIX, reparam=True, reparam_hidden=16)
    params = prompts.init_prefix(DEC_CFG, config, jax.random.key(0))
    assert params["embedding"].shape == (P_PREFIX, D)
    assert params["mlp"]["down"]["kernel"].shape == (16, LAYERS * 2 * H_KV * K)
    params = perturb(params)
    k_LPHK, v_LPHK = prompts.prefix_kv(params, DEC_CFG)
    assert k_LPHK.shape == v_LPHK.shape == (LAYERS, P_PREFIX, H_KV, K)
    # Layer l's keys and values are slices of the MLP output for each slot.
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h = np.tanh(p["embedding"] @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
    out_PO = h @ p["mlp"]["down"]["kernel"] + p["mlp"]["down"]["bias"]
    block = H_KV * K
    for layer in range(LAYERS):
        k_cols = out_PO[:, (2 * layer) * block : (2 * layer + 1) * block]
        v_cols = out_PO[:, (2 * layer + 1) * block : (2 * layer + 2) * block]
        np.testing.assert_allclose(
            k_LPHK[layer].reshape(P_PREFIX, block), k_cols, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            v_LPHK[layer].reshape(P_PREFIX, block), v_cols, rtol=1e-5, atol=1e-6
        )


def test_direct_prefix_params_are_the_kv():
    config = prompts.PrefixConfig(P_PREFIX, reparam=False)
    params = prompts.init_prefix(DEC_CFG, config, jax.random.key(0))
    assert set(params) == {"key", "value"}
    k_LPHK, v_LPHK = prompts.prefix_kv(params, DEC_CFG)
    assert k_LPHK is params["key"] and v_LPHK is params["value"]
    assert k_LPHK.shape == (LAYERS, P_PREFIX, H_KV, K)
    with pytest.raises(ValueError, match="expected"):
        prompts.prefix_kv(params, TransformerConfig(**{**TINY, "num_kv_heads": 1}))


def test_model_rejects_badly_shaped_adapters(models):
    params, cfg, _ = models["decoder"]
    model = TextDecoder(cfg)
    tokens = _tokens()
    with pytest.raises(ValueError, match=r"prompt_TD has shape \(3, 5\)"):
        model.apply({"params": params}, tokens, prompt_TD=jnp.zeros((3, 5)))
    bad = jnp.zeros((LAYERS + 1, P_PREFIX, H_KV, K))
    with pytest.raises(ValueError, match="num_layers=2"):
        model.apply({"params": params}, tokens, prefix_kv=(bad, bad))
    with pytest.raises(ValueError, match="method='lora'"):
        prompts.model_kwargs("lora", {}, cfg)


# --- (f) prompt init ----------------------------------------------------------------


def test_prompt_init_from_vocab_rows(models):
    params, _, _ = models["encoder"]
    embedding = np.asarray(params["token_embed"]["embedding"])
    ids = [5, 0, 60]
    given = prompts.init_prompt(
        params, prompts.PromptConfig(3), jax.random.key(0), vocab_ids=ids
    )["prompt"]
    np.testing.assert_array_equal(given, embedding[ids])
    drawn = prompts.init_prompt(params, prompts.PromptConfig(10), jax.random.key(1))
    rows = np.asarray(drawn["prompt"])
    matches = [np.flatnonzero((embedding == row).all(-1)) for row in rows]
    assert all(len(m) == 1 for m in matches), "each row is one vocabulary embedding"
    assert len({int(m[0]) for m in matches}) == 10, "ids are distinct"
    with pytest.raises(ValueError, match=r"outside \[0, 61\)"):
        prompts.init_prompt(
            params, prompts.PromptConfig(2), jax.random.key(0), vocab_ids=[1, 61]
        )
    with pytest.raises(ValueError, match="num_tokens=0"):
        prompts.PromptConfig(0)


def test_prompt_init_random_scale(models):
    params, _, _ = models["encoder"]
    prompt = prompts.init_prompt(
        params, prompts.PromptConfig(200, init="random"), jax.random.key(0)
    )["prompt"]
    assert prompt.shape == (200, D)
    want = float(np.std(params["token_embed"]["embedding"]))
    assert abs(float(np.std(prompt)) / want - 1) < 0.1
