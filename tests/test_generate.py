"""KV-cache generation (fmjax.inference.generate) on tiny random decoders: the
cached path against full recomputation, batching, padding, sampling, stops."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.inference import cache_growth, stops
from fmjax.inference import generate as gen
from fmjax.inference import sampling as smp
from fmjax.models import build_model, model_config
from fmjax.models.dense import (
    ColumnParts,
    Packed,
    PackedKernel,
    PartCounts,
    decoding_parts,
)
from fmjax.models.text import decoding_head

VOCAB, PAD, BOS, EOS = 200, 0, 2, 3
IDS = types.SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS)

DECODERS = {
    "learned": dict(position="learned"),
    "rope_gqa": dict(position="rope", num_heads=4, num_kv_heads=2, head_dim=16),
    "bf16": dict(position="rope", dtype="bfloat16"),
    "untied": dict(position="learned", tie_embeddings=False),
}


def _decoder(name):
    fields = dict(
        kind="decoder",
        vocab_size=VOCAB,
        d_model=64,
        num_layers=2,
        num_heads=2,
        head_dim=32,
        mlp_dim=128,
        max_len=64,
        layer_norm_eps=1e-5,
        init_std=0.3,  # peaked logits: no near-ties decide an argmax
    )
    cfg = model_config({**fields, **DECODERS[name]})
    module = build_model(cfg)
    tokens = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(module.init(jax.random.key(0), tokens)["params"])
    return module, params


@pytest.fixture(scope="module")
def decoders():
    return {name: _decoder(name) for name in DECODERS}


@pytest.fixture(scope="module")
def learned():
    return _decoder("learned")


PROMPTS = [[BOS, 5, 17, 9, 44, 102], [BOS, 7], [BOS, 150, 151, 152, 8, 9, 10, 11, 12]]


def _adapter_kwargs(kind, cfg):
    key = jax.random.key(9)
    if kind == "prompt":
        return {"prompt_TD": jax.random.normal(key, (3, cfg.d_model))}
    if kind == "prefix":
        shape = (cfg.num_layers, 2, cfg.kv_heads, cfg.head_dim)
        return {"prefix_kv": tuple(jax.random.normal(key, (2, *shape)))}
    return {}


def _full_logits(module, params, kwargs, rows):
    """[B, L, V] next-token logits of each row (right-padded), recomputed from
    scratch: position i's logits follow row[: i + 1]."""
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], segments[i, : len(row)] = row, 1
    out = module.apply(
        {"params": params}, jnp.asarray(tokens), segment_ids_BL=segments, **kwargs
    )
    return np.asarray(out["logits"])


@pytest.mark.parametrize(
    "name, adapter",
    [("learned", "none"), ("learned", "prompt"), ("rope_gqa", "none"),
     ("rope_gqa", "prefix"), ("bf16", "none"), ("untied", "none")],
)  # fmt: skip
def test_cached_decoding_equals_full_recomputation(decoders, name, adapter):
    """At every step, the logits the cache gives equal a full forward pass over
    prompt + new tokens, for each row of a left-padded batch of different
    lengths (learned positions, RoPE with GQA, bfloat16; prompt and prefix
    adapters; tied and untied heads). Each step's logits also equal those
    made from the hidden states with `decoding_head`, as `Generator` makes
    them on CPU. Halfway the cache grows by 32 empty slots, as a Generator
    grows it (`cache_growth`): the logits stay those of full recomputation."""
    module, params = decoders[name]
    kwargs = _adapter_kwargs(adapter, module.config)
    generator = gen.Generator(module, params, IDS, kwargs, max_len=64)
    new = generator.generate_ids(PROMPTS, max_new_tokens=10)
    full = _full_logits(
        module, params, kwargs, [p + n for p, n in zip(PROMPTS, new, strict=True)]
    )
    width = gen.bucket(max(map(len, PROMPTS)))
    tokens = np.zeros((4, width), np.int32)
    lengths = np.ones(4, np.int32)
    for i, ids in enumerate(PROMPTS):
        tokens[i, width - len(ids) :], lengths[i] = ids, len(ids)
    keys = jax.random.split(jax.random.key(0), 4)
    done = np.arange(4) >= 3
    statics = dict(sampling=smp.Sampling(), eos_id=EOS, pad_id=PAD)
    prefill = jax.jit(
        lambda p, k, *a: gen.prefill(module, p, k, *a, new_slots=32, **statics)
    )
    step = jax.jit(functools.partial(gen.decode_step, module))
    head_DV = decoding_head(module.config, params)
    state, logits_BV = prefill(params, kwargs, tokens, lengths, keys, done)
    # bfloat16 matmuls over 16 vs 50 key slots round differently (logits ~ 4).
    atol = 0.1 if name == "bf16" else 2e-4
    for t in range(10):
        for b, ids in enumerate(PROMPTS):
            if t >= len(new[b]):
                continue  # this row ended with EOS
            want = full[b, len(ids) + t - 1]
            np.testing.assert_allclose(logits_BV[b], want, atol=atol, rtol=0)
            if name != "bf16":  # greedy picks the argmax of the full logits
                assert new[b][t] == int(np.argmax(want))
        if t == 5:
            state = cache_growth.grow(state, 32)
        fed = [row[t] if t < len(row) else EOS for row in new] + [EOS]
        state = state._replace(token_B=jnp.asarray(fed, jnp.int32))
        logits_BV, cache = step(params, kwargs, state)
        from_head_BV, _ = step(params, kwargs, state, head_DV)
        np.testing.assert_allclose(from_head_BV, logits_BV, atol=atol / 10, rtol=0)
        state = state._replace(cache=cache, position_B=state.position_B + 1)


def test_nf4_params_decode_through_the_models_own_head(learned):
    """With an NF4 table (QLoRA's frozen base, not merged) `decoding_head`
    declines and the Generator decodes through the model's head: the same
    tokens as a Generator given the table dequantised, where the [D, V] copy
    is used."""
    from fmjax.adapt.quant import dequantize_tree, is_matrix, quantize_tree

    module, params = learned
    nf4 = quantize_tree(params, is_matrix)
    assert decoding_head(module.config, nf4) is None
    plain = dequantize_tree(nf4)
    assert decoding_head(module.config, plain) is not None
    ours = gen.Generator(module, nf4, IDS, max_len=64).generate_ids(PROMPTS, 8)
    want = gen.Generator(module, plain, IDS, max_len=64).generate_ids(PROMPTS, 8)
    assert ours == want


def test_batched_equals_one_by_one(learned):
    """Left padding and batch padding change nothing: greedy and seeded
    samples of each prompt equal those of the prompt alone."""
    generator = gen.Generator(*learned, IDS, max_len=64)
    sampling = smp.Sampling(temperature=1.0, top_k=20)
    for settings in (dict(), dict(sampling=sampling, seed=3)):
        batched = generator.generate_ids(PROMPTS, 12, batch_size=8, **settings)
        alone = []
        for i, ids in enumerate(PROMPTS):
            *_, tokens_BN = generator.stream_ids([ids], 12, row_ids=[i], **settings)
            alone.append(generator._until_eos(tokens_BN[0]))
        assert batched == alone, settings
        assert generator.generate_ids(PROMPTS, 12, batch_size=2, **settings) == alone
    # On CPU the 4 rows of 3 prompts, the 2 rows and one row decode with
    # packed kernels (fmjax.native), compared above; a model computed in
    # another dtype reads its kernels in parts (by size) or whole.
    assert gen.bucket(3, 1) == 4
    assert decoding_parts(1, 2**30) is None  # a big model: no second copy
    assert decoding_parts(4, 0, False) == (2, 2) and decoding_parts(2, 0, False) is None
    assert decoding_parts(1, 0, False) == (4, 16)
    cpu = jax.default_backend() == "cpu"
    ways = {decoding_parts(4, 0), decoding_parts(2, 0), decoding_parts(1, 0)}
    assert ways == {Packed(PartCounts(2, 2)), Packed(None), Packed(PartCounts(4, 16))}
    assert set(generator._parts) == (ways if cpu else set())
    for params, head in generator._parts.values():
        assert isinstance(head, PackedKernel)
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PackedKernel))
        packed = [x for x in leaves if isinstance(x, PackedKernel)]
        assert len(packed) == 6 * generator.module.config.num_layers


@pytest.mark.parametrize("name", ["rope_gqa", "untied"])
def test_kernels_in_column_parts_give_the_same_logits(decoders, name):
    """`split_kernels`: every projection kernel (query, key/value with GQA,
    out, MLP, an untied head) as column ranges of its [inputs, outputs]
    matrix gives the model's logits, over many rows and over one (a vector);
    NF4 codes and kernels whose outputs do not divide stay whole. On CPU a
    Generator decodes with them (`test_batched_equals_one_by_one` compares
    its ways)."""
    from fmjax.adapt.quant import is_matrix, is_quantized, quantize_tree
    from fmjax.models.dense import column_parts, product_by_parts, split_kernels
    from fmjax.models.registry import param_axes

    module, params = decoders[name]
    axes = param_axes(module.config)
    parts = split_kernels(params, lambda kernel: 2, axes)
    kernels = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(
            parts, is_leaf=lambda x: isinstance(x, ColumnParts)
        )
        if isinstance(x, ColumnParts)
    ]
    # query, key, value, out, up, down in each layer; an untied head
    assert len(kernels) == module.config.num_layers * 6 + (name == "untied")
    for path, x in kernels:
        whole = functools.reduce(lambda t, k: t[k.key], path, params)
        joined = np.concatenate(x.parts, axis=1).reshape(whole.shape)
        np.testing.assert_array_equal(joined, whole)
    # Packed kernels (fmjax.native's product, where it builds) too: every
    # kernel a PackedKernel, an NF4 one whole (tests/test_native.py: the product).
    packed = split_kernels(params, Packed(None), axes)
    for tokens in ([PROMPTS[0]], [PROMPTS[0][:1]]):
        tokens = jnp.asarray(tokens, jnp.int32)
        want = module.apply({"params": params}, tokens)["logits"]
        got = module.apply({"params": parts}, tokens)["logits"]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        if jax.default_backend() == "cpu":
            got = module.apply({"params": packed}, tokens)["logits"]
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert column_parts(jnp.ones((4, 3)), 2).shape == (4, 3)
    nf4 = quantize_tree(params, is_matrix)
    assert jax.tree.all(
        jax.tree.map(
            lambda a, b, c: a is b is c,
            split_kernels(nf4, lambda kernel: 2, axes),
            split_kernels(nf4, Packed(None), axes),
            nf4,
            is_leaf=is_quantized,
        )
    )
    # An out projection [G, K, D] contracts two dims; the equation must say so.
    kernel = jax.random.normal(jax.random.key(0), (2, 4, 8))
    x = jax.random.normal(jax.random.key(1), (3, 1, 2, 4))
    split = column_parts(kernel, 4, num_in=2)
    for rows in (x, x[:1]):
        np.testing.assert_allclose(
            product_by_parts(jnp.einsum, "BLGK,GKD->BLD", rows, split),
            jnp.einsum("BLGK,GKD->BLD", rows, kernel),
            atol=1e-6,
        )
    with pytest.raises(ValueError, match="BLGK,GKD->BDL"):
        product_by_parts(jnp.einsum, "BLGK,GKD->BDL", x, split)


def test_a_growing_cache_decodes_what_a_whole_one_does(decoders, monkeypatch):
    """A Generator whose cache starts with 32 new slots and doubles between
    decode calls (`cache_growth`) gives the tokens of one made whole at the
    prefill: greedy and seeded samples, streamed in chunks that meet the
    growth inside a chunk, with left padding, GQA and prefix slots."""
    module, params = decoders["rope_gqa"]
    kwargs = _adapter_kwargs("prefix", module.config)
    generator = gen.Generator(module, params, IDS, kwargs, max_len=64)
    no_eos = types.SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=-1)
    endless = gen.Generator(module, params, no_eos, kwargs, max_len=64)
    assert cache_growth.capacities(module.config, 4, 16, 64, 1) == [32, 64]
    assert cache_growth.capacities(module.config, 4, 16, 64, 2**30) == [64]
    assert cache_growth.capacities(module.config, 4, 16, 160, 1) == [32, 64, 128, 160]
    sampling = smp.Sampling(temperature=1.0, top_k=20)
    got, chunks = {}, {}
    for grows in (True, False):
        monkeypatch.setattr(cache_growth, "grows_cache", lambda *a, g=grows: g)
        chunks[grows] = list(endless.stream_ids(PROMPTS, 45, chunk=5))
        got[grows] = [
            generator.generate_ids(PROMPTS, 45),
            generator.generate_ids(PROMPTS, 45, sampling, seed=3),
            chunks[grows][-1].tolist(),
        ]
    assert got[True] == got[False]
    # Every 5 steps, and at 33, where the first 32 new slots are full.
    widths = [1, 6, 11, 16, 21, 26, 31]
    assert [c.shape[1] for c in chunks[False]] == [*widths, 36, 41, 45]
    assert [c.shape[1] for c in chunks[True]] == [*widths, 33, 38, 43, 45]
    for a, b in zip(chunks[True], chunks[True][1:], strict=False):
        np.testing.assert_array_equal(b[:, : a.shape[1]], a)


def test_greedy_is_deterministic_and_samples_follow_the_seed(learned):
    generator = gen.Generator(*learned, IDS, max_len=64)
    greedy = generator.generate_ids(PROMPTS, 16)
    assert generator.generate_ids(PROMPTS, 16) == greedy
    warm = smp.Sampling(temperature=1.5)
    first = generator.generate_ids(PROMPTS, 16, warm, seed=1)
    assert generator.generate_ids(PROMPTS, 16, warm, seed=1) == first
    assert generator.generate_ids(PROMPTS, 16, warm, seed=2) != first
    assert first != greedy
    top1 = smp.Sampling(temperature=1.5, top_k=1, top_p=0.5)
    assert generator.generate_ids(PROMPTS, 16, top1, seed=4) == greedy


def test_eos_ends_a_row_and_the_loop_exits_early(learned):
    module, params = learned
    unstopped = gen.Generator(module, params, IDS, max_len=64)
    free = unstopped.generate_ids(PROMPTS[:1], 16)[0]
    eos = free[4]  # the row's 5th new token becomes its end of sequence
    ids = types.SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=eos)
    stopped = gen.Generator(module, params, ids, max_len=64)
    assert stopped.generate_ids(PROMPTS[:1], 16)[0] == free[: free.index(eos)]
    chunks = list(stopped.stream_ids(PROMPTS[:1], 16, chunk=3))
    # The loop stops at the step that produced EOS, inside a chunk.
    assert chunks[-1].shape == (1, free.index(eos) + 1)
    assert chunks[-1][0, -1] == eos


def test_streaming_chunks_grow_to_the_whole_generation(learned):
    generator = gen.Generator(*learned, IDS, max_len=64)
    whole = generator.generate_ids(PROMPTS[:1], 11)[0]
    chunks = list(generator.stream_ids(PROMPTS[:1], 11, chunk=4))
    assert [c.shape[1] for c in chunks] == [1, 5, 9, 11]
    assert chunks[-1][0].tolist()[: len(whole)] == whole
    for a, b in zip(chunks, chunks[1:], strict=False):
        np.testing.assert_array_equal(b[:, : a.shape[1]], a)


def test_greedy_picks_what_argmax_picks():
    """`first_argmax` (greedy's two-reduction argmax) equals jnp.argmax on ties
    (the first maximum), NaN (the first NaN), all -inf and +inf rows."""
    x = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
    x[1, [7, 3, 250]] = 9.0
    x[2, [60, 50]] = np.nan
    x[3] = -np.inf
    x[4, 20] = np.inf
    x[5, -1] = 20.0
    got = np.asarray(jax.jit(smp.first_argmax)(x))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, [np.argmax(x[0]), 3, 50, 0, 20, 299])


def test_top_k_and_top_p_keep_the_tokens_hf_keeps():
    """probs [0.5, 0.3, 0.15, 0.05]: top_p=0.8 keeps {0, 1} (HF drops the
    ascending tail whose cumulative mass is <= 0.2), top_p=0.85 keeps {0, 1, 2},
    top_k=3 keeps {0, 1, 2}; kept tokens keep their relative odds."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(
        jax.vmap(lambda key, s: smp.sample(logits, key[None], s)[0], (0, None)),
        static_argnums=1,
    )
    top3 = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]
    cases = {
        smp.Sampling(temperature=1.0, top_p=0.8): [0.5 / 0.8, 0.3 / 0.8, 0, 0],
        smp.Sampling(temperature=1.0, top_p=0.85): top3,
        smp.Sampling(temperature=1.0, top_k=3): top3,
        smp.Sampling(temperature=1.0): [0.5, 0.3, 0.15, 0.05],
    }
    for sampling, want in cases.items():
        freq = np.bincount(np.asarray(draw(keys, sampling)), minlength=4) / 4000
        np.testing.assert_allclose(freq, want, atol=0.03, err_msg=str(sampling))
        assert np.all(freq[np.asarray(want) == 0] == 0), sampling


def test_stop_strings_truncate_exactly():
    assert stops.truncate("one. two. three", [". "]) == "one"
    assert stops.truncate("one. two\nthree", ["\n", "two"]) == "one. "
    assert stops.truncate("abc", ["x", ""]) == "abc"
    assert stops.truncate("abc", []) == "abc"


def test_bad_requests_name_the_value(learned):
    generator = gen.Generator(*learned, IDS, max_len=64)
    with pytest.raises(ValueError, match="max_len=64"):
        generator.generate_ids([[BOS] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generator.generate_ids(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generator.generate_ids([[BOS], []])
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            smp.Sampling(**bad)
    encoder = build_model(model_config(dict(kind="encoder", vocab_size=10,
        d_model=8, num_layers=1, num_heads=1, head_dim=8, mlp_dim=8)))  # fmt: skip
    with pytest.raises(ValueError, match="kind='encoder'"):
        gen.Generator(encoder, {}, IDS)


def test_a_stream_holds_back_what_may_begin_a_stop_string():
    assert stops.stop_prefix_length("the end. Th", [". The", "\n"]) == 4
    assert stops.stop_prefix_length("the end.", [". The"]) == 1
    assert stops.stop_prefix_length("the end", [". The"]) == 0
    assert stops.stop_prefix_length("abc", []) == 0
