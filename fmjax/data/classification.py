"""One-example-per-row classification batches from a labelled source.

    it = make_classification_iterator(source, tokenizer, seq_len=128,
                                      batch_size=32, seed=0)

Batches are dicts of numpy arrays, B = batch_size, L = seq_len:
  tokens       int32 [B, L]  [bos] a [eos] (single text) or [bos] a [eos] b [eos]
  segment_ids  int32 [B, L]  1 on tokens, 0 on padding (no packing)
  positions    int32 [B, L]  0..n-1, 0 on padding
  type_ids     int32 [B, L]  0 for [bos] a [eos], 1 for b [eos], 0 on padding
  labels       int32 [B]
  weights      float32 [B]   1 for real rows, 0 for the rows padding an eval batch
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from fmjax.data import text
from fmjax.data.sharded import shard_read_options
from fmjax.data.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions", "type_ids", "labels", "weights")


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep of two texts so they fit `budget`, trimming the longer.

    Same as removing one token at a time from the longer text (from b on a tie).
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if short <= budget // 2:
        rest = budget - short
        return (rest, short) if len_a > len_b else (short, rest)
    return (budget + 1) // 2, budget // 2


class _Encode(grain.transforms.Map):
    """One example -> padded rows of tokens, type ids and its label."""

    def __init__(self, tokenizer: Tokenizer, text_fields: Sequence[str], seq_len: int):
        self._tokenizer = tokenizer
        self._text_fields = tuple(text_fields)
        self._seq_len = seq_len

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        row = encode_example(self._tokenizer, example, self._text_fields, self._seq_len)
        row["labels"] = np.int32(example["label"])
        row["weights"] = np.float32(1.0)
        return row


def encode_example(
    tok: Tokenizer, example: dict[str, Any], text_fields: Sequence[str], seq_len: int
) -> dict[str, np.ndarray]:
    """tokens, segment_ids, positions, type_ids [seq_len] of one example's texts."""
    texts = [tok.encode(example[f]) for f in text_fields]
    budget = seq_len - len(texts) - 1
    if len(texts) == 1:
        kept = [min(len(texts[0]), budget)]
    else:
        kept = truncate_pair(len(texts[0]), len(texts[1]), budget)
    pieces = [[tok.bos_id]]
    types = [[0]]
    for type_id, (ids, keep) in enumerate(zip(texts, kept, strict=True)):
        pieces.append([*ids[:keep], tok.eos_id])
        types.append([type_id] * (keep + 1))
    ids_L = np.concatenate(pieces).astype(np.int32)
    n, pad = len(ids_L), seq_len - len(ids_L)
    return {
        "tokens": np.pad(ids_L, (0, pad), constant_values=tok.pad_id),
        "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
        "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
        "type_ids": np.pad(np.concatenate(types).astype(np.int32), (0, pad)),
    }


class _PadBatch(grain.transforms.Map):
    """Pads a short last batch with rows of weight 0 and segment_ids 0."""

    def __init__(self, batch_size: int, pad_id: int):
        self._batch_size = batch_size
        self._pad_id = pad_id

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pad_rows = self._batch_size - batch["labels"].shape[0]
        if not pad_rows:
            return batch
        out = {}
        for key, x in batch.items():
            widths = [(0, pad_rows)] + [(0, 0)] * (x.ndim - 1)
            fill = self._pad_id if key == "tokens" else 0
            out[key] = np.pad(x, widths, constant_values=fill)
        return out


def make_classification_iterator(
    source: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    text_fields: Sequence[str] = ("text",),
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
    """Batches of this process's slice of `source`, one example a row.

    `batch_size` is per process; process i of n reads examples i, i+n, ....
    Examples are reshuffled every epoch from `seed`. The iterator's
    `get_state()` / `set_state()` resume exactly (see fmjax.data.text). With
    `drop_remainder=False` a short last batch is padded with weight-0 rows.
    """
    text_fields = (text_fields,) if isinstance(text_fields, str) else text_fields
    if not 1 <= len(text_fields) <= 2:
        raise ValueError(f"text_fields={text_fields}; expected one or two fields")
    min_len = 2 * len(text_fields) + 1  # specials plus a token of each text
    if seq_len < min_len:
        raise ValueError(
            f"seq_len={seq_len}; {len(text_fields)} text field(s) need >= {min_len}"
        )
    text._check_args(  # batch size, process index, source size
        source, seq_len, batch_size, "causal", process_index, process_count
    )
    examples = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        examples = examples.shuffle(seed=seed)
    if repeat:
        examples = examples.repeat()
    rows = examples.map(_Encode(tokenizer, text_fields, seq_len)).to_iter_dataset(
        shard_read_options(batch_size)
    )
    batches = rows.batch(batch_size, drop_remainder=drop_remainder)
    return iter(batches.map(_PadBatch(batch_size, tokenizer.pad_id)))


def make_classification_eval_iterator(
    source: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    text_fields: Sequence[str] = ("text",),
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """One pass in source order: each example of this process's slice once.

    The last batch is padded with weight-0 rows; sum(weights) counts examples.
    With several processes each may yield a different number of batches; the
    caller pads to the longest.
    """
    return make_classification_iterator(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        repeat=False,
        text_fields=text_fields,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=False,
    )
