"""`fmjax bench train` for dual encoders (configs/clip.py): image-text pairs/s
of a full optimizer step (forward, backward, AdamW update).

With `--against hf`, HF transformers' `CLIPModel` (PyTorch, float32) trains
the same batch with the same optimizer and thread count, its config made from
fmjax's by the converter's mapping (`fmjax.convert.clip.hf_config_from_model`:
widths, depths, heads, activations per tower, projection width, initial
temperature). Its loss is CLIPModel's `return_loss=True` symmetric InfoNCE,
fmjax's the clip task's; after each update both clamp the temperature
(`objective.max_logit_scale`). Rounds alternate between the two sides as in
`fmjax.bench_vision`.

The text batch is what the clip task feeds: BOS, random words, EOS, then right
padding (segment id 0 / attention mask 0). fmjax pools the last real token
(`text_pool="last"`), HF the first `eos_token_id`: the same token, so the
compared text towers do the same work. Only the softmax loss with "last"
pooling of a causal text tower has an HF CLIP twin; other configs are refused
(SigLIP, mean-pooled BERT towers).

The trained parameter counts of both sides must agree, and do for every config
the mapping accepts: HF's patch conv has no bias where fmjax's patch embedding
has one (D numbers), and HF's position table has a row for the class token
(D numbers) where fmjax folds it into `cls`. A config whose counts differ
(e.g. `model.text.tie_embeddings=False`: an LM head fmjax holds but never
reads) is refused before timing, naming both counts.
"""

from __future__ import annotations

import types

import numpy as np

from fmjax.bench_rounds import in_child
from fmjax.bench_torch import hf_device, hf_train_step, torch_setup
from fmjax.bench_vision import check_hf_float32, compare_train_steps
from fmjax.config import ConfigError
from fmjax.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from fmjax.tasks import task_for

# The caption tokenizer's ids (fmjax's SentencePiece convention).
CAPTION_IDS = types.SimpleNamespace(pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)
FIRST_WORD_ID = MASK_ID + 1  # random words avoid the special ids


def random_pairs(task, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The clip task's batch of `rows` random pairs: images [B, H, W, C] ~
    N(0, 1); captions of 1 to text_len - 2 random words between BOS and EOS,
    right-padded; all rows weighted 1."""
    image, vocab = task.model_config.image, task.model_config.text.vocab_size
    if vocab <= FIRST_WORD_ID:
        raise ConfigError(
            f"model.text.vocab_size={vocab}: random captions need ids above the "
            f"special ids 0..{MASK_ID}"
        )
    rng = np.random.default_rng(seed)
    length = task.text_len
    shape = (rows, image.image_size, image.image_size, image.channels)
    images_BHWC = rng.standard_normal(shape).astype(np.float32)
    real_B = rng.integers(3, length + 1, rows)  # BOS + at least one word + EOS
    real_BL = np.arange(length)[None, :] < real_B[:, None]
    words_BL = rng.integers(FIRST_WORD_ID, vocab, (rows, length))
    tokens_BL = np.where(real_BL, words_BL, PAD_ID).astype(np.int32)
    tokens_BL[:, 0] = BOS_ID
    tokens_BL[np.arange(rows), real_B - 1] = EOS_ID
    batch = {
        "images": images_BHWC,
        "tokens": tokens_BL,
        "segment_ids": real_BL.astype(np.int32),
        "labels": np.arange(rows, dtype=np.int32),
        "weights": np.ones(rows, np.float32),
    }
    expected = task.abstract_batch(rows)
    for key, spec in expected.items():
        assert batch[key].shape == spec.shape and batch[key].dtype == spec.dtype, (
            f"random_pairs[{key!r}]: {batch[key].shape} {batch[key].dtype}; the "
            f"task expects {spec.shape} {spec.dtype}"
        )
    return batch


def hf_clip_model(task):
    """HF CLIPModel of the task's DualEncoder shapes (random weights)."""
    import transformers

    from fmjax.convert.clip import hf_config_from_model
    from fmjax.errors import FormatError

    objective = task.config.objective
    if objective.loss != "softmax":
        raise ConfigError(
            f"--against hf: objective.loss={objective.loss!r}; HF CLIPModel "
            f"trains the softmax (InfoNCE) loss only"
        )
    model = task.model_config
    for name, tower in (("image", model.image), ("text", model.text)):
        if tower.dropout_rate:
            raise ConfigError(
                f"--against hf: model.{name}.dropout_rate={tower.dropout_rate}; "
                f"HF CLIP drops attention weights only"
            )
    try:
        hf_config = hf_config_from_model(model.to_dict(), CAPTION_IDS)
    except FormatError as e:
        raise ConfigError(f"--against hf: {e}") from None
    return transformers.CLIPModel(transformers.CLIPConfig.from_dict(hf_config))


def _hf_step(config, batch: dict, threads: int, device: str = "cpu"):
    """(run, trained params, attention implementation) of HF's CLIPModel
    training on `batch`, on `device`."""
    import torch

    task = task_for(config, with_data=False)
    device = torch_setup(threads, device)
    model = hf_clip_model(task)
    pixels = np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))
    inputs = {
        "pixel_values": torch.from_numpy(pixels),
        "input_ids": torch.from_numpy(batch["tokens"]).long(),
        "attention_mask": torch.from_numpy(batch["segment_ids"]).long(),
        "return_loss": True,
    }
    high = task.config.objective.max_logit_scale

    def clamp_temperature():  # the clip task's constrain_params
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, high)

    run = hf_train_step(model, task.config.optimizer, inputs, clamp_temperature, device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return run, trained, model.config._attn_implementation


def bench_train_pairs(
    config, against: str, warmup: int, steps: int, rounds: int, threads: int,
    peak: float,
) -> dict:  # fmt: skip
    """fmjax (and HF) pairs/s and MFU for a dual encoder; see the module doc."""
    if against not in ("", "hf"):
        raise ConfigError(f"--against {against!r}; expected 'hf'")
    task = task_for(config, with_data=False)
    model = task.model_config
    dtypes = {
        "model.image.dtype": model.image.dtype,
        "model.text.dtype": model.text.dtype,
    }
    shapes = {
        "image_size": model.image.image_size,
        "text_len": task.text_len,
        "dtype": "/".join(sorted(set(dtypes.values()))),  # both towers
    }
    batch = random_pairs(task, config.data.batch_size)
    hf_step, attention = None, None
    if against:
        check_hf_float32(dtypes)
        run, trained, attention = in_child(
            _hf_step, config, batch, threads, hf_device()
        )
        hf_step = (run, trained)
    result = compare_train_steps(
        config, batch, hf_step, "pairs", warmup, steps, rounds, peak,
        same_params=True,
    )  # fmt: skip
    if against:
        result["hf"]["attn_implementation"] = attention
    return {**shapes, **result}
