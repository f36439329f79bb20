"""Train step invariants and sharding-rule checks, on a tiny decoder."""

import jax
import numpy as np
import pytest

from fmjax import chunked_loss, objectives
from fmjax import sharding as shd
from fmjax.config import load_config
from fmjax.models import build_model
from fmjax.tasks import task_for
from fmjax.train.run import init_state
from fmjax.train.state import make_optimizer
from fmjax.train.step import jit_train_step


def _setup(mesh_shape=(-1, 1, 1), adapt=None, **model_overrides):
    config = load_config("configs/gpt_lm.py:tiny")
    config.model.update(vocab_size=256, d_model=32, head_dim=16, mlp_dim=64)
    config.model.update(model_overrides)
    config.adapt.update(adapt or {})
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 256, size=(8, 32)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    segment_ids[:, 24:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(24), np.arange(8)])[None].repeat(8, 0)
    batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    mesh = shd.make_mesh(*mesh_shape)
    task = task_for(config, with_data=False)
    model = build_model(task.model_config)
    tx, lr_fn = make_optimizer(10, **config.optimizer)
    _, shardings, init = init_state(task, model, tx, mesh, seed=0)
    return task, mesh, model, lr_fn, shardings, init, batch


def _run(accum, steps=2, **kw):
    task, mesh, model, lr_fn, shardings, init, batch = _setup(**kw)
    config = task.config
    loss_fn = task.loss_fn(model)
    with shd.activate(mesh, config.mesh.rules):
        step = jit_train_step(loss_fn, lr_fn, accum, shardings, mesh)
        state = init()
        losses = []
        for _ in range(steps):
            state, metrics = step(state, shd.global_batch(batch, mesh))
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return jax.device_get(state.params), losses


def test_gradient_accumulation_equals_one_big_batch():
    params_1, losses_1 = _run(accum=1)
    params_4, losses_4 = _run(accum=4)
    np.testing.assert_allclose(losses_1, losses_4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_trains_like_whole_logits_on_a_sharded_mesh(monkeypatch):
    """The causal task's train step on a 2x2x2 mesh (batch over data x fsdp,
    vocab over tensor): the loss over chunks of 8 positions (2 rows per device
    x 8 x 256 logits) gives the whole-logits run's losses and params."""
    whole_params, whole_losses = _run(accum=1, mesh_shape=(2, 2, 2))
    chunk_lens = []

    def spy(hidden_BLD, logits_fn, targets_BL, weights_BL, chunk_len, **kwargs):
        chunk_lens.append(chunk_len)
        return chunked(
            hidden_BLD, logits_fn, targets_BL, weights_BL, chunk_len, **kwargs
        )

    chunked = chunked_loss.chunked_cross_entropy
    monkeypatch.setattr(chunked_loss, "chunked_cross_entropy", spy)
    params, losses = _run(
        accum=1, mesh_shape=(2, 2, 2), max_logits_elements=2 * 8 * 256
    )
    assert chunk_lens == [8]  # traced once, 4 chunks of the 32 positions
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-5)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(whole_params), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_trains_close_to_float32():
    _, losses_f32 = _run(accum=1, steps=3)
    params, losses_bf16 = _run(accum=1, steps=3, dtype="bfloat16")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(losses_f32, losses_bf16, rtol=2e-2)
    assert losses_f32 != losses_bf16  # bf16 really computed in lower precision


def test_params_land_on_the_mesh_by_rules():
    *_, shardings, init, _ = _setup(mesh_shape=(2, 2, 2))
    mlp_up = shardings.params["layers_0"]["mlp"]["up"]["kernel"]
    assert mlp_up.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    state = init()
    kernel = state.params["layers_0"]["mlp"]["up"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32 // 2, 64 // 2)


def test_rules_that_would_silently_replicate_are_refused():
    mesh = shd.make_mesh(2, 2, 2)
    with pytest.raises(shd.ShardingError, match="mesh has no axis 'model'"):
        shd.normalize_rules([("mlp", "model")], mesh)
    rules = shd.normalize_rules([("embed", "fsdp")], mesh)
    with pytest.raises(shd.ShardingError, match="logical axis 'mlp'.*no sharding rule"):
        shd.spec_for(("embed", "mlp"), (4, 6), rules, mesh, "layers_0/mlp/up/kernel")
    rules = shd.normalize_rules([("embed", "fsdp"), ("vocab", "tensor")], mesh)
    with pytest.raises(shd.ShardingError, match=r"token_embed.*size 7.*not divisible"):
        shd.spec_for(("vocab", "embed"), (7, 4), rules, mesh, "token_embed/embedding")


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), "8 are available"),
        ((-1, -1, 1), "at most one axis"),
        ((-1, 3, 1), "not divisible"),
    ],
)
def test_bad_mesh_shapes(sizes, message):
    with pytest.raises(shd.ShardingError, match=message):
        shd.make_mesh(*sizes)


def test_mlm_scoring_only_masked_positions_equals_full_logits():
    config = load_config("configs/bert_mlm.py:tiny")
    config.model.update(vocab_size=256, d_model=32, head_dim=16, mlp_dim=64)
    model = build_model(config.model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 256, size=(4, 64)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    inputs, targets, weights = objectives.mlm_mask(
        jax.random.PRNGKey(3),
        tokens,
        segment_ids,
        mask_id=4,
        vocab_size=256,
        special_ids=(0, 1, 2, 3, 4),
    )
    full_logits = model.apply({"params": params}, inputs)["logits"]
    _, full = objectives.mlm_loss(full_logits, targets, weights)
    num = objectives.max_predictions(64, 0.15)
    assert num < 64 and int(weights.sum(1).max()) <= num
    positions, targets_k, weights_k = objectives.gather_predictions(
        targets, weights, num
    )
    # Every selected position is among the scored ones.
    assert float(weights_k.sum()) == float(weights.sum())
    logits_k = model.apply({"params": params}, inputs, predict_positions_BK=positions)
    assert logits_k["logits"].shape == (4, num, 256)
    _, gathered = objectives.mlm_loss(logits_k["logits"], targets_k, weights_k)
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(gathered[key], full[key], rtol=1e-5)


def test_lora_trains_adapters_only_through_the_train_step():
    """The trainer's frozen/trainable split: LoRA adapters are the state's params,
    the base model is `frozen`, which the step reads but never changes."""
    adapt = dict(method="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    task, mesh, model, _, shardings, init, batch = _setup(adapt=adapt)
    config = task.config
    tx, lr_fn = make_optimizer(10, **{**config.optimizer, "learning_rate": 1e-2})
    _, shardings, init = init_state(task, model, tx, mesh, seed=0)
    loss_fn = task.loss_fn(model)
    with shd.activate(mesh, config.mesh.rules):
        state = init()
        base_before = jax.device_get(state.frozen)  # the step donates its input
        adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
        assert set(state.params) == {"model", "lora"} and not state.params["model"]
        step = jit_train_step(loss_fn, lr_fn, 1, shardings, mesh)
        losses = []
        for _ in range(4):
            state, metrics = step(state, shd.global_batch(batch, mesh))
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
    assert losses[-1] < losses[0]
    for a, b in zip(
        jax.tree.leaves(base_before), jax.tree.leaves(state.frozen), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # the base model never moves
    moment_bytes = sum(
        x.nbytes for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0
    )
    assert moment_bytes == 2 * adapter_bytes  # AdamW moments for adapters only


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_activation_checkpointing_gives_the_same_training(policy):
    params, losses = _run(accum=1, steps=2)
    params_remat, losses_remat = _run(accum=1, steps=2, remat=policy)
    np.testing.assert_allclose(losses_remat, losses, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(params_remat), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resume_refuses_another_model_but_not_a_newer_fmjax(tmp_path):
    """check_resumable compares the state-shaping groups key by key; a key the
    saved run does not have (written by an fmjax before that setting existed)
    is not a difference, and neither are the step's layout settings."""
    import json

    from fmjax.config import ConfigError, to_json
    from fmjax.train.run import check_resumable

    config = load_config("configs/gpt_lm.py:tiny")
    saved = json.loads(to_json(config))
    del saved["model"]["max_logits_elements"]  # an older fmjax's run
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resumable(str(tmp_path), config)
    wider = load_config("configs/gpt_lm.py:tiny", ["--config.model.d_model=256"])
    with pytest.raises(ConfigError, match=r"model.d_model: 128 -> 256"):
        check_resumable(str(tmp_path), wider)
    # How the step is laid out (chunks, rematerialisation) may change.
    layout = ["--config.model.max_logits_elements=4096", "--config.model.remat=full"]
    layout.append("--config.model.max_attention_elements=0")
    check_resumable(str(tmp_path), load_config("configs/gpt_lm.py:tiny", layout))
