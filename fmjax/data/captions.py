"""Captions of image-text pairs: where they come from and how they are tokenized.

    captions = captions_of(record, caption_key)  # every caption of one image
    tokens_NL, segment_ids_NL = encode_captions(tokenizer, texts, length)

A record's captions are, in order of preference: its `captions` list
(emoji_captions, csv:/jsonl: pairs), its `caption_key` feature (a string or a
list of strings, or COCO-style dicts with "text"), or, for a class-labelled
image dataset (`fashion_mnist`), sentences made from its label name with
templates (`LabelCaptions`): "a photo of a trouser.", ...

A caption is [BOS] + its tokens + [EOS], cut to `length` (the EOS kept) and
padded on the right with the tokenizer's pad id; segment id 1 marks real
tokens. The EOS is the token a causal text tower pools (CLIP's), and for a
BERT tower BOS/EOS are its [CLS]/[SEP].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Templates for captions made from class names (training on labelled images);
# CLIP's zero-shot templates are in fmjax.inference.zeroshot.
LABEL_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a small photo of a {}.",
    "a black and white photo of a {}.",
    "a {}.",
    "{}",
)


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):  # COCO captions: {"id": ..., "text": ...}
        return _text(value.get("text", ""))
    return str(value)


def captions_of(record: Mapping[str, Any], caption_key: str = "caption") -> list[str]:
    """Every non-empty caption of one record (see the module docstring)."""
    for key in ("captions", caption_key):
        if key in record:
            value = record[key]
            values = [value] if isinstance(value, str | bytes) else list(value)
            texts = [t.strip() for t in map(_text, values) if _text(t).strip()]
            if texts:
                return texts
    raise KeyError(
        f"record has no caption: expected a 'captions' list or a {caption_key!r} "
        f"feature; its features are {sorted(record)}"
    )


def readable_label(name: str) -> str:
    """A class name as captions say it: "T-shirt/top" -> "t-shirt or top"
    (zero-shot prompts must spell names as training captions did)."""
    return name.replace("_", " ").replace("/", " or ").lower()


def label_captions(name: str, templates: Sequence[str]) -> list[str]:
    """Sentences about class `name`, one per template."""
    return [t.format(readable_label(name)) for t in templates]


@dataclasses.dataclass(frozen=True)
class CaptionTokens:
    """`text_fn` of the image pipeline (`fmjax.data.images.WithText`): one of
    the record's captions, drawn by the example's rng (or the first, with
    `draw=False`), tokenized to `length`. `label_names`: captions made from
    the label with `templates` instead of read from the record."""

    tokenizer: Any
    length: int
    caption_key: str = "caption"
    draw: bool = True
    label_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = LABEL_TEMPLATES

    def captions(self, record) -> list[str]:
        if self.label_names:
            return label_captions(
                self.label_names[int(record["label"])], self.templates
            )
        return captions_of(record, self.caption_key)

    def __call__(self, record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = self.captions(record)
        index = int(rng.integers(len(captions))) if self.draw else 0
        tokens, segments = encode_captions(
            self.tokenizer, [captions[index]], self.length
        )
        return {"tokens": tokens[0], "segment_ids": segments[0]}


def encode_captions(tokenizer, texts: Sequence[str], length: int):
    """(tokens [N, length] int32, segment ids [N, length] int32)."""
    if length < 3:
        raise ValueError(f"caption length {length}: expected >= 3 (BOS, a token, EOS)")
    tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
    segments = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        ids = [
            tokenizer.bos_id,
            *tokenizer.encode(text)[: length - 2],
            tokenizer.eos_id,
        ]
        tokens[row, : len(ids)] = ids
        segments[row, : len(ids)] = 1
    return tokens, segments
