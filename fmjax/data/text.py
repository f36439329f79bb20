"""grain pipelines: text source -> tokens -> packed [B, L] batches.

Each batch is a dict of int32 arrays of shape [batch_size, seq_len]:
  tokens       packed token ids, 0 (pad) where a row is empty
  segment_ids  1, 2, 3, ... for the pieces packed in a row, 0 for padding
  positions    0..n-1 restarting in every segment, 0 for padding
  loss_mask    1 where a token is one a causal model learns to predict: every
               token of a document; of a prompt-completion record
               (`fmjax.data.documents`) the completion and its eos only

The iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON-able
dict and `set_state(state)` resumes exactly where it was taken; a run's
global batch is a `fmjax.data.sharded.ShardedIterator` of such pipelines, and
`fmjax.checkpoint` saves its state beside the train state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from fmjax.data.tokenizer import Tokenizer

Objective = Literal["causal", "mlm"]
OBJECTIVES = ("causal", "mlm")
BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
# A record with these fields is a prompt and its completion (fmjax.data.documents).
PROMPT_KEY, COMPLETION_KEY = "prompt", "completion"


def document_chunks(
    ids: Sequence[int],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    objective: Objective = "causal",
) -> list[np.ndarray]:
    """Splits one document's token ids into segments of at most `seq_len`.

    A document that fits is `[bos] + ids + [eos]` for both objectives. A longer
    one is cut so that every chunk starts with bos: for `causal` only the last
    chunk ends with eos (the document's end); for `mlm` every chunk is
    `[bos] + piece + [eos]` (CLS ... SEP).
    """
    ids_L = np.asarray(ids, dtype=np.int32)
    if objective == "causal":
        body_L = np.append(ids_L, np.int32(eos_id))
        step = seq_len - 1
        return [
            np.concatenate([[bos_id], body_L[i : i + step]]).astype(np.int32)
            for i in range(0, len(body_L), step)
        ]
    if objective == "mlm":
        step = seq_len - 2
        starts = range(0, max(len(ids_L), 1), step)
        return [
            np.concatenate([[bos_id], ids_L[i : i + step], [eos_id]]).astype(np.int32)
            for i in starts
        ]
    raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")


def completion_chunk(
    prompt: Sequence[int],
    completion: Sequence[int],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
) -> dict[str, np.ndarray]:
    """`[bos] + prompt + completion + [eos]` as one segment, with loss_mask 1 on
    the completion and eos. Too long for `seq_len`, the prompt loses its first
    tokens (the bos stays); a completion that alone does not fit is cut at its
    end (and has no eos)."""
    room = seq_len - 2 - len(completion)
    if room < 0:
        prompt, completion, end = [], list(completion)[: seq_len - 1], []
    else:
        keep = min(room, len(prompt))  # the prompt's last `keep` tokens
        prompt, end = list(prompt)[len(prompt) - keep :], [eos_id]
    tokens = np.asarray([bos_id, *prompt, *completion, *end], np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[1 + len(prompt) :] = 1
    return {"tokens": tokens, "loss_mask": loss_mask}


class _Tokenize(grain.transforms.Map):
    """A record's token ids: its text's, or (prompt ids, completion ids)."""

    def __init__(self, tokenizer: Tokenizer, text_key: str):
        self._tokenizer = tokenizer
        self._text_key = text_key

    def _encode(self, text) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tokenizer.encode(text), dtype=np.int32)

    def map(self, record: Any):
        if not isinstance(record, dict):
            return self._encode(record)
        if COMPLETION_KEY in record and self._text_key not in record:
            return self._encode(record[PROMPT_KEY]), self._encode(
                record[COMPLETION_KEY]
            )
        return self._encode(record[self._text_key])


class _Chunk(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20  # Long documents make many chunks; only a guard.

    def __init__(self, seq_len: int, bos_id: int, eos_id: int, objective: Objective):
        self._kwargs = dict(
            seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, objective=objective
        )

    def flat_map(self, ids) -> list[dict[str, np.ndarray]]:
        if isinstance(ids, tuple):  # (prompt, completion)
            if self._kwargs["objective"] == "causal":
                kwargs = {k: v for k, v in self._kwargs.items() if k != "objective"}
                return [completion_chunk(*ids, **kwargs)]
            ids = np.concatenate(ids)  # mlm reads the whole text
        return [
            {"tokens": c, "loss_mask": np.ones_like(c)}
            for c in document_chunks(ids, **self._kwargs)
        ]


class _ToBatch(grain.transforms.Map):
    """Renames grain's packing keys and pads a short last batch with empty rows."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {
            "tokens": packed["tokens"],
            "segment_ids": packed["tokens_segment_ids"],
            "positions": packed["tokens_positions"],
            "loss_mask": packed["loss_mask"],
        }
        out = {}
        for key, x_BL in batch.items():
            pad_rows = self._batch_size - x_BL.shape[0]
            out[key] = np.pad(x_BL, ((0, pad_rows), (0, 0))).astype(np.int32)
        return out


def _check_args(
    source: Sequence[Any],
    seq_len: int,
    batch_size: int,
    objective: str,
    process_index: int,
    process_count: int,
) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")
    min_len = 2 if objective == "causal" else 3
    if seq_len < min_len:
        raise ValueError(f"seq_len={seq_len}; {objective} needs at least {min_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected a positive integer")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} with process_count={process_count}; "
            "expected 0 <= process_index < process_count"
        )
    if len(source) < process_count:
        raise ValueError(
            f"source has {len(source)} records, fewer than process_count="
            f"{process_count}: some processes would get no data"
        )


def make_text_iterator(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    objective: Objective = "causal",
    process_index: int = 0,
    process_count: int = 1,
    text_key: str = "text",
    drop_remainder: bool = True,
    num_packing_bins: int | None = None,
    num_threads: int = 0,
    prefetch: int = 0,
) -> grain.DatasetIterator:
    """Packed batches of this process's slice of `source` (see module doc).

    `batch_size` is per process. Process i of n reads records i, i+n, i+2n, ...
    Documents are reshuffled every epoch from `seed`; packing fills
    `num_packing_bins` rows (default 4 * batch_size) first-fit before emitting
    them, shuffled. With `drop_remainder=False` a short last batch is padded
    with empty rows. `num_threads` tokenizes in threads and `prefetch` > 0
    prepares that many batches in a thread; output stays deterministic.
    """
    _check_args(source, seq_len, batch_size, objective, process_index, process_count)
    docs = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        docs = docs.shuffle(seed=seed)
    if repeat:
        docs = docs.repeat()
    ids = docs.map(_Tokenize(tokenizer, text_key)).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=16)
    )
    chunks = grain.experimental.FlatMapIterDataset(
        ids, _Chunk(seq_len, tokenizer.bos_id, tokenizer.eos_id, objective)
    )
    rows = grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_packing_bins or 4 * batch_size,
        seed=seed,
        shuffle_bins=shuffle,
    )
    batches = rows.batch(batch_size, drop_remainder=drop_remainder)
    batches = batches.map(_ToBatch(batch_size))
    if prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch
        )
    return iter(batches)


def make_eval_iterator(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    objective: Objective = "causal",
    process_index: int = 0,
    process_count: int = 1,
    text_key: str = "text",
    num_packing_bins: int | None = None,
) -> grain.DatasetIterator:
    """One pass in a fixed order: every document chunk appears exactly once.

    Same batch format; the last batch is padded with empty rows (segment_ids
    all 0). With several processes each may yield a different number of
    batches; the caller pads to the longest.
    """
    return make_text_iterator(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        repeat=False,
        objective=objective,
        process_index=process_index,
        process_count=process_count,
        text_key=text_key,
        drop_remainder=False,
        num_packing_bins=num_packing_bins,
    )
