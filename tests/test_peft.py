"""PEFT LoRA adapter interop on real all-MiniLM-L6-v2 weights: fmjax -> PEFT and
PEFT -> fmjax give the same hidden states, and the refusals name the bad value."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fmjax  # noqa: E402
from fmjax.adapt.lora import (  # noqa: E402
    ALL_LINEAR,
    DEFAULT_TARGETS,
    LoraConfig,
    init_lora,
    merge,
)
from fmjax.adapt.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft, save_peft  # noqa: E402
from fmjax.api import Model  # noqa: E402
from fmjax.models import param_axes  # noqa: E402

SENTENCES = [
    "Hello, world!",
    "A longer sentence that goes on, with commas; numbers like 42 and more words "
    "so that its row sets the padded width of the batch.",
    "Café naïve Zürich: Ångström's résumé.",
]


@pytest.fixture(scope="module")
def fm(minilm_dir):
    return fmjax.load(minilm_dir)


@pytest.fixture(scope="module")
def batch(fm):
    ids = fm.encode_batch(SENTENCES)
    mask = ids != fm.tokenizer.pad_id
    assert (~mask).any(), "the batch must contain padding"
    return ids, mask


def _fmjax_hidden(fm, lora, config, ids):
    params = merge(fm.params, lora, config)
    return Model(fm.module, params, fm.tokenizer, fm.config).hidden(ids)


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def _random_lora(fm, config, seed=0):
    """init_lora with lora_b random too (at init B = 0: the adapter does nothing)."""
    lora = init_lora(
        fm.params, config, jax.random.key(seed), param_axes(fm.module.config)
    )
    leaves, treedef = jax.tree.flatten_with_path(lora)
    rng = np.random.default_rng(seed)
    out = [
        rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['lora_b']")
        else np.asarray(leaf)
        for path, leaf in leaves
    ]
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize(
    "targets, hf_targets",
    [
        (DEFAULT_TARGETS, ["query", "value"]),
        (
            ALL_LINEAR,
            # "output.dense" matches attention.output.dense too; "dense" the pooler
            [
                "intermediate.dense",
                "key",
                "output.dense",
                "query",
                "value",
            ],
        ),
    ],
    ids=["query_value", "all_linear"],
)
def test_fmjax_adapter_loads_in_peft(
    fm, batch, minilm_dir, tmp_path, targets, hf_targets
):
    ids, mask = batch
    config = LoraConfig(rank=4, alpha=8.0, targets=targets)
    lora = _random_lora(fm, config)
    got = _fmjax_hidden(fm, lora, config, ids)
    base = fm.hidden(ids)
    assert np.abs(got - base)[mask].max() > 1e-2, "the adapter must change outputs"

    save_peft(tmp_path, lora, config, base_model_name_or_path=minilm_dir)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4
    assert written["lora_alpha"] == 8 and written["target_modules"] == hf_targets
    size = os.path.getsize(tmp_path / ADAPTER_WEIGHTS)
    print(f"{ADAPTER_WEIGHTS} ({'/'.join(hf_targets)}): {size / 1024:.0f} KiB")
    assert size < 5 * 2**20

    base_model = transformers.AutoModel.from_pretrained(minilm_dir)
    model = peft.PeftModel.from_pretrained(base_model, str(tmp_path)).eval()
    adapted = {
        name for name, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A
    }
    assert len(adapted) == 6 * len(targets)  # exactly the adapted projections
    want = _torch_hidden(model, ids, mask)
    diff = np.abs(got - want)[mask].max()
    print(f"max |hidden fmjax+LoRA - PEFT| on real tokens: {diff:.2e}")
    assert diff <= 1e-4

    lora2, config2 = load_peft(
        tmp_path, fm.params, axes=param_axes(fm.module.config)
    )  # and back: exactly the same
    assert config2.targets == tuple(sorted(config.targets))
    assert config2 == LoraConfig(rank=4, alpha=8.0, targets=config2.targets)
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_peft_adapter_loads_in_fmjax(fm, batch, minilm_dir, tmp_path):
    ids, mask = batch
    torch.manual_seed(0)
    base_model = transformers.AutoModel.from_pretrained(minilm_dir)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value", "output.dense"]
    )
    model = peft.get_peft_model(base_model, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(tmp_path))
    want = _torch_hidden(model.eval(), ids, mask)

    lora, config = load_peft(tmp_path, fm.params, axes=param_axes(fm.module.config))
    assert config.rank == 4 and config.alpha == 16.0
    assert config.targets == (
        "attention/out/kernel",
        "attention/query/kernel",
        "attention/value/kernel",
        "mlp/down/kernel",
    )
    got = _fmjax_hidden(fm, lora, config, ids)
    assert np.abs(got - fm.hidden(ids))[mask].max() > 1e-2
    diff = np.abs(got - want)[mask].max()
    print(f"max |hidden PEFT - fmjax+loaded LoRA| on real tokens: {diff:.2e}")
    assert diff <= 1e-4


# ------------------------------------------------------------------ refusals


@pytest.fixture
def saved(fm, tmp_path):
    config = LoraConfig(rank=4)
    save_peft(tmp_path, _random_lora(fm, config), config)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"use_dora": True}, "use_dora=True"),
        ({"rank_pattern": {"query": 8}}, "rank_pattern="),
        ({"r": 8}, r"r=8"),
    ],
)
def test_load_refuses_unsupported_configs(fm, saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message):
        load_peft(saved, fm.params, axes=param_axes(fm.module.config))


def test_load_refuses_pickles_and_foreign_tensors(fm, saved):
    from safetensors.numpy import load_file, save_file

    path = saved / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    tensors["base_model.model.pooler.dense.lora_A.weight"] = np.zeros((4, 384))
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="pooler.dense.lora_A"):
        load_peft(saved, fm.params, axes=param_axes(fm.module.config))
    os.remove(path)
    (saved / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle"):
        load_peft(saved, fm.params, axes=param_axes(fm.module.config))


def test_save_refuses_rank_mismatch(fm, tmp_path):
    lora = _random_lora(fm, LoraConfig(rank=4))
    with pytest.raises(ValueError, match="LoraConfig.rank=8"):
        save_peft(tmp_path, lora, LoraConfig(rank=8))
