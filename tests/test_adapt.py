"""LoRA, NF4 quantisation and trainable masks (fmjax.adapt)."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.adapt import lora, masks, quant
from fmjax.models import build_model, param_axes
from fmjax.models.dense import EinsumDense
from fmjax.train.state import TrainState, make_optimizer

D, H, K, F, V, LAYERS, MAX_LEN = 32, 2, 16, 64, 64, 2, 16
TINY = {
    "kind": "decoder",
    "vocab_size": V,
    "d_model": D,
    "num_layers": LAYERS,
    "num_heads": H,
    "head_dim": K,
    "mlp_dim": F,
    "max_len": MAX_LEN,
}


@pytest.fixture(scope="module")
def tiny():
    """(params, tokens, jitted logits fn) of a 2-layer decoder."""
    model = build_model(TINY)
    tokens_BL = jax.random.randint(jax.random.key(1), (2, 8), 0, V)
    params = nn.unbox(model.init(jax.random.key(0), tokens_BL)["params"])
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t)["logits"])
    return params, tokens_BL, logits


AXES = param_axes(TINY)  # each param's logical axis names


def _lora_logits(model, params, adapters, config, tokens_BL, rng=None, train=False):
    """Logits with each adapted matmul's LoRA path (no merged kernel)."""
    with lora.wrap_matmuls(adapters, config, rng=rng, deterministic=not train):
        return model.apply({"params": params}, tokens_BL)["logits"]


def _random_b(lora_params, seed=0, std=0.1):
    """Adapters with random B, as after some training."""
    flat = jax.tree_util.tree_flatten_with_path(lora_params)[0]
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))

    def fill(path, x):
        if path[-1].key != "lora_b":
            return x
        return std * jax.random.normal(next(keys), x.shape)

    return jax.tree_util.tree_map_with_path(fill, lora_params)


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(tree, sep="/")


def _bits(x):
    return np.asarray(x).view(np.uint32)


# --- LoRA ---------------------------------------------------------------------


def test_lora_with_zero_b_is_the_base_model(tiny):
    params, tokens_BL, logits = tiny
    config = lora.LoraConfig(rank=4)
    adapters = lora.init_lora(params, config, jax.random.key(2), AXES)
    for path, x in _flat(adapters).items():
        assert np.any(x != 0) == path.endswith("lora_a"), path
    merged = lora.merge(params, adapters, config)
    for base, eff in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(_bits(eff), _bits(base))
    model = build_model(TINY)
    adapted = jax.jit(lambda p, a, t: _lora_logits(model, p, a, config, t))
    # Equal up to XLA fusing the (zero) LoRA sum differently.
    np.testing.assert_allclose(
        adapted(params, adapters, tokens_BL), logits(params, tokens_BL), atol=1e-6
    )


def test_merge_equals_the_wrapped_matmuls_and_unmerge_recovers_base(tiny):
    params, tokens_BL, logits = tiny
    model = build_model(TINY)
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_LINEAR)
    adapters = _random_b(lora.init_lora(params, config, jax.random.key(3), AXES))
    adapted = jax.jit(lambda p, a, t: _lora_logits(model, p, a, config, t))
    logits_lora = adapted(params, adapters, tokens_BL)
    merged = lora.merge(params, adapters, config)
    np.testing.assert_allclose(logits(merged, tokens_BL), logits_lora, atol=1e-5)
    # The adapters matter, so the comparison above is not trivially equal.
    assert np.abs(logits_lora - logits(params, tokens_BL)).max() > 1e-3
    restored = lora.unmerge(merged, adapters, config)
    for base, back in zip(
        jax.tree.leaves(params), jax.tree.leaves(restored), strict=True
    ):
        np.testing.assert_allclose(back, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("module", ["query", "out"])
def test_delta_is_x_a_b_times_scale(tiny, module):
    """One projection with its LoRA path == x W + b + scale x A B (NumPy), and the
    merged kernel gives the same."""
    params, _, _ = tiny
    config = lora.LoraConfig(
        rank=4, alpha=12.0, targets=(f"attention/{module}/kernel",)
    )
    adapters = _random_b(lora.init_lora(params, config, jax.random.key(4), AXES))
    merged = lora.merge(params, adapters, config)
    w = np.asarray(params["layers_0"]["attention"][module]["kernel"])
    bias = np.asarray(params["layers_0"]["attention"][module]["bias"])
    ab = adapters["layers_0"]["attention"][module]
    a_IR, b_RO = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
    rng = np.random.default_rng(0)
    if module == "query":  # [D, H, K]: input D, output H*K
        equation, x = "BLD,DHK->BLHK", rng.normal(size=(2, 5, D))
        names, n_in, n_out = ("embed", "heads", "kv"), D, H * K
    else:  # [H, K, D]: input H*K, output D
        equation, x = "BLHK,HKD->BLD", rng.normal(size=(2, 5, H, K))
        names, n_in, n_out = ("heads", "kv", "embed"), H * K, D
    assert a_IR.shape == (n_in, 4) and b_RO.shape == (4, n_out)
    x_BI = x.reshape(10, n_in)
    want = x_BI @ w.reshape(n_in, n_out) + config.scale * (x_BI @ a_IR) @ b_RO
    want = want + bias.reshape(1, -1)
    layer = EinsumDense(equation, w.shape, names)
    variables = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}}
    with lora.wrap_matmuls({"lora_a": a_IR, "lora_b": b_RO}, config):
        got = layer.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-5)
    kernel = merged["layers_0"]["attention"][module]["kernel"]
    got = layer.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-5)


def test_default_targets_hit_query_and_value_all_linear_hits_six(tiny):
    params, _, _ = tiny
    default = lora.init_lora(params, lora.LoraConfig(), jax.random.key(0), AXES)
    assert lora.lora_param_paths(default) == [
        f"layers_{i}/attention/{m}/lora_{ab}"
        for i in range(LAYERS)
        for m in ("query", "value")
        for ab in "ab"
    ]
    config = lora.LoraConfig(rank=4, targets=lora.ALL_LINEAR)
    all_linear = lora.init_lora(params, config, jax.random.key(0), AXES)
    shapes = {p: x.shape for p, x in _flat(all_linear).items()}
    assert len(shapes) == LAYERS * 6 * 2
    layer = {p.split("/", 1)[1]: s for p, s in shapes.items() if "layers_1/" in p}
    assert layer == {
        "attention/query/lora_a": (D, 4), "attention/query/lora_b": (4, H * K),
        "attention/key/lora_a": (D, 4), "attention/key/lora_b": (4, H * K),
        "attention/value/lora_a": (D, 4), "attention/value/lora_b": (4, H * K),
        "attention/out/lora_a": (H * K, 4), "attention/out/lora_b": (4, D),
        "mlp/up/lora_a": (D, 4), "mlp/up/lora_b": (4, F),
        "mlp/down/lora_a": (F, 4), "mlp/down/lora_b": (4, D),
    }  # fmt: skip


def test_lora_rejects_bad_configs_and_targets(tiny):
    params, _, _ = tiny
    for kwargs, named in [
        ({"rank": 0}, "rank=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"targets": "query"}, "'query'"),
        ({"targets": ("(",)}, "("),
    ]:
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            lora.LoraConfig(**kwargs)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="layers_0/attention/query/kernel"):
        lora.init_lora(params, lora.LoraConfig(targets=("q_proj",)), key, AXES)
    with pytest.raises(ValueError, match="bias"):
        lora.init_lora(params, lora.LoraConfig(targets=("mlp/up/.*",)), key, AXES)
    odd = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}}
    odd_axes = {"conv/kernel": ("h", "heads", "w", "kv")}
    with pytest.raises(ValueError, match="conv/kernel.*split the head axes"):
        lora.init_lora(odd, lora.LoraConfig(targets=("conv/kernel",)), key, odd_axes)
    with pytest.raises(ValueError, match="logical axis names"):
        lora.init_lora(odd, lora.LoraConfig(targets=("conv/kernel",)), key)
    assert masks.path_matches("layers_0/attention/query/kernel", "query/kernel")
    assert not masks.path_matches("layers_0/attention/xquery/kernel", "query/kernel")


def test_trainable_fraction_rank_4(tiny):
    params, _, _ = tiny
    config = lora.LoraConfig(rank=4)
    adapters = lora.init_lora(params, config, jax.random.key(0), AXES)
    per_layer = 2 * (4 * (D + H * K))  # query and value: r * (in + out)
    assert lora.count_lora_params(adapters) == LAYERS * per_layer == 1024
    assert lora.lora_param_count(params, config, AXES) == 1024
    block = (
        2 * 2 * D + 3 * (D * H * K + H * K) + (H * K * D + D) + D * F + F + F * D + D
    )
    base = V * D + MAX_LEN * D + LAYERS * block + 2 * D
    assert masks.count_params(params) == base == 19712
    summary = masks.trainable_summary(adapters, {"base": params, "lora": adapters})
    assert summary == (
        "trainable params: 1,024 || all params: 20,736 || trainable%: 4.9383"
    )


def test_dropout_is_per_element_of_the_input_as_in_peft():
    """With A = B = I and W = 0 the LoRA path is scale * dropout(x): each input
    element is dropped or scaled by 1/(1-p) on its own (PEFT's nn.Dropout on x),
    not one mask shared by every row."""
    n, p = 64, 0.5
    layer = EinsumDense("BD,DF->BF", (n, n), ("embed", "mlp"), use_bias=False)
    variables = {"params": {"kernel": jnp.zeros((n, n))}}
    eye = jnp.eye(n)
    adapters = {"lora_a": eye, "lora_b": eye}
    config = lora.LoraConfig(rank=n, alpha=float(n), dropout=p, targets=("kernel",))
    x = jnp.ones((16, n))
    with lora.wrap_matmuls(adapters, config):  # deterministic: no dropout
        np.testing.assert_allclose(layer.apply(variables, x), x, atol=1e-6)
    with pytest.raises(ValueError, match="needs rng"):
        with lora.wrap_matmuls(adapters, config, deterministic=False):
            pass
    with lora.wrap_matmuls(
        adapters, config, rng=jax.random.key(5), deterministic=False
    ):
        y = np.asarray(layer.apply(variables, x))
    kept = np.isclose(y, 1 / (1 - p), rtol=1e-6)
    assert np.all(kept | (y == 0))
    assert 0.4 < kept.mean() < 0.6, kept.mean()
    assert len({tuple(row) for row in kept}) == len(kept)  # a new mask per row


def test_qlora_gradients_reach_only_b_at_init(tiny):
    """With B = 0, dL/dA = x^T dL/dy B^T = 0 exactly while dL/dB != 0; the NF4
    kernels are read as they are (each dequantised inside its matmul)."""
    params, tokens_BL, _ = tiny
    model = build_model(TINY)
    base_q = quant.quantize_tree(params)
    config = lora.LoraConfig(rank=4)
    adapters = lora.init_lora(base_q, config, jax.random.key(0), AXES)

    def loss(adapters, base_q):
        logits_BLV = _lora_logits(model, base_q, adapters, config, tokens_BL)
        return -jnp.mean(jax.nn.log_softmax(logits_BLV)[..., 0])

    grads = jax.jit(jax.grad(loss))(adapters, base_q)
    for path, g in _flat(grads).items():
        assert np.all(np.isfinite(g))
        assert np.any(g != 0) == path.endswith("lora_b"), path
    # NF4 kernels inside their matmuls == the dequantised tree.
    with_codes = _lora_logits(model, base_q, adapters, config, tokens_BL)
    dequantized = quant.dequantize_tree(base_q)
    expected = _lora_logits(model, dequantized, adapters, config, tokens_BL)
    np.testing.assert_allclose(with_codes, expected, atol=1e-5)


# --- NF4 (the rest of its tests: tests/test_nf4.py) -----------------------------

_GAP = np.diff(quant.NF4_CODES).max()  # the widest step between NF4 levels


def test_quantize_tree_keeps_embeddings_and_round_trips(tiny):
    params, _, _ = tiny
    base_q = quant.quantize_tree(params)
    quantized = [p for p, x in _flat(base_q).items() if quant.is_quantized(x)]
    assert len(quantized) == LAYERS * 6 and all(p.endswith("kernel") for p in quantized)
    assert masks.count_params(base_q) == masks.count_params(params)
    restored = quant.dequantize_tree(base_q)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for base, back in zip(
        jax.tree.leaves(params), jax.tree.leaves(restored), strict=True
    ):
        assert back.shape == base.shape and back.dtype == base.dtype
        assert np.abs(back - base).max() <= _GAP / 2 * np.abs(base).max() * 1.01


# --- memory: adapters beside the matmul, NF4 dequantised per matmul -----------------


@pytest.fixture(scope="module")
def step_memory():
    """XLA's memory analysis of the real train step (bench memory's path) for a
    decoder whose kernels outweigh its activations: 4 layers with 256 x 2048 MLP
    kernels (21 MiB of kernels in float32), one row of 16 tokens."""
    from fmjax import sharding as shd
    from fmjax.bench import compiled_step_memory
    from fmjax.config import load_config

    out = {}
    for method in ("full", "lora", "qlora"):
        config = load_config(
            "configs/gpt_lm.py:tiny",
            [
                "model.vocab_size=256", "model.d_model=256", "model.num_layers=4",
                "model.num_heads=4", "model.head_dim=64", "model.mlp_dim=2048",
                "data.batch_size=1", "data.seq_len=16", f"adapt.method={method}",
                "adapt.lora_targets=all-linear", "mesh.num_devices=1",
            ],
        )  # fmt: skip
        mesh = shd.mesh_from_config(config.mesh)
        out[method] = compiled_step_memory(config, mesh)
    kernels = 4 * (4 * 256 * 256 + 2 * 256 * 2048)
    return out, 4 * kernels


def test_lora_never_builds_a_full_size_merged_kernel(step_memory):
    """Merging W + A B for each of the 24 adapted kernels would need their full
    size in temporaries; the LoRA path beside the matmul needs a sliver (what
    remains is XLA:CPU's layout copies of the attention kernels, and
    activations)."""
    memory, kernel_bytes = step_memory
    assert memory["lora"]["temp_bytes"] < 0.5 * kernel_bytes, memory["lora"]


def test_qlora_dequantises_one_kernel_at_a_time(step_memory):
    """Dequantising the whole NF4 tree would hold every kernel in float32 at once;
    per-matmul dequantisation (recomputed in the backward pass) holds about one
    layer's. The NF4 arguments are ~1/7.75 of the f32 ones."""
    memory, kernel_bytes = step_memory
    assert memory["qlora"]["temp_bytes"] < 0.5 * kernel_bytes, memory["qlora"]
    assert memory["qlora"]["argument_bytes"] < 0.3 * memory["lora"]["argument_bytes"]
    assert memory["qlora"]["total_bytes"] < memory["lora"]["total_bytes"]
    assert memory["lora"]["total_bytes"] < memory["full"]["total_bytes"]


def test_train_patterns_train_beside_the_adapter(tiny):
    """`adapt.train_patterns` (PEFT's modules_to_save) pick params that train with
    the adapter; the rest is frozen, and only trained params get optimizer state."""
    from fmjax.adapt.methods import Adaptation
    from fmjax.config import adapt_config
    from fmjax.models import model_config

    params, _, _ = tiny
    adapt = adapt_config("lora")
    adapt.update(train_patterns=("layers_1/mlp/.*", "final_norm/.*"))
    adaptation = Adaptation.from_config(adapt, model_config(TINY))
    trained, frozen = adaptation.split(params, jax.random.key(0))
    on = sorted(_flat(trained["model"]))
    assert on == sorted(
        [f"layers_1/mlp/{m}/{n}" for m in ("up", "down") for n in ("kernel", "bias")]
        + ["final_norm/scale", "final_norm/bias"]
    )
    assert not set(on) & set(_flat(frozen))
    state = TrainState.create(trained, _optimizer(), jax.random.key(0), frozen)
    assert _state_bytes(state.opt_state)[0] == 2 * 4 * masks.count_params(trained)


def _optimizer():
    tx, _ = make_optimizer(
        10, learning_rate=1e-2, warmup_steps=0, schedule="constant",
        end_learning_rate_ratio=1.0, weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-8,
        grad_clip_norm=1.0,
    )  # fmt: skip
    return tx


def _state_bytes(opt_state) -> tuple[int, int]:
    """(bytes in non-scalar state leaves, bytes in scalar ones)."""
    leaves = jax.tree.leaves(opt_state)
    return (
        sum(x.nbytes for x in leaves if x.ndim),
        sum(x.nbytes for x in leaves if not x.ndim),
    )


def test_lora_training_leaves_base_bit_identical(tiny):
    params, tokens_BL, _ = tiny
    model = build_model(TINY)
    config = lora.LoraConfig(rank=4, targets=lora.ALL_LINEAR)
    adapters = lora.init_lora(params, config, jax.random.key(0), AXES)
    state = TrainState.create(adapters, _optimizer(), jax.random.key(0), params)
    assert _state_bytes(state.opt_state)[0] == 2 * 4 * lora.count_lora_params(adapters)

    def loss_fn(adapters, base):
        logits_BLV = _lora_logits(model, base, adapters, config, tokens_BL)
        targets_BL = jnp.roll(tokens_BL, -1, axis=1)
        logp_BLV = jax.nn.log_softmax(logits_BLV)
        return -jnp.mean(jnp.take_along_axis(logp_BLV, targets_BL[..., None], -1))

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen)
        return state.apply_gradients(grads), loss

    losses = []
    for _ in range(5):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    for base, now in zip(
        jax.tree.leaves(params), jax.tree.leaves(state.frozen), strict=True
    ):
        np.testing.assert_array_equal(_bits(now), _bits(base))
    b_now = state.params["layers_0"]["attention"]["query"]["lora_b"]
    assert np.abs(b_now).max() > 0


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_base_keeps_unquantised_params_in_compute_dtype(tiny, compute_dtype):
    """QLoRA with a bfloat16 compute dtype stores the frozen params it does not
    quantise (embeddings, norms, biases) in bfloat16, as loading the base in
    that dtype does; float32 leaves them untouched. The forward pass still runs."""
    from fmjax.adapt.methods import Adaptation
    from fmjax.config import adapt_config
    from fmjax.models import model_config

    params, tokens_BL, _ = tiny
    adapt = adapt_config("qlora")
    adapt.compute_dtype = compute_dtype
    adaptation = Adaptation.from_config(adapt, model_config(TINY))
    trained, frozen = adaptation.split(params, jax.random.key(0))
    leaves = jax.tree.leaves(frozen, is_leaf=quant.is_quantized)
    floats = [x for x in leaves if not quant.is_quantized(x)]
    assert {str(x.dtype) for x in floats} == {compute_dtype}
    embedding = _flat(frozen)["token_embed/embedding"]
    assert embedding.dtype == compute_dtype
    assert embedding.nbytes == params["token_embed"]["embedding"].nbytes // (
        4 // jnp.dtype(compute_dtype).itemsize
    )
    model = build_model(TINY)
    logits = adaptation.apply(model, trained, frozen, None, False, tokens_BL)["logits"]
    assert np.all(np.isfinite(logits))
