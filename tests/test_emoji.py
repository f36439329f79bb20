"""The emoji_captions dataset (fmjax.data.emoji): Noto Color Emoji renders with
their names as captions, built once (a few seconds) from Debian's font."""

import re
import unicodedata

import numpy as np
import pytest

from fmjax.data import emoji as emoji_data
from fmjax.data import sources

SPLITS = ("train", "validation", "test")
GRINNING_FACE = "\U0001f600"


@pytest.fixture(scope="module")
def records(emoji_dir):
    """Every example of each split, as `load_source` returns them."""
    return {
        split: list(sources.load_source("emoji_captions", split, str(emoji_dir)))
        for split in SPLITS
    }


def _chroma(image_HWC: np.ndarray) -> np.ndarray:
    """Per pixel max - min over RGB: 0 for greys, large for saturated colour."""
    return image_HWC.max(axis=-1).astype(int) - image_HWC.min(axis=-1)


def _words(caption: str) -> str:
    """'Piñata' and 'PINATA' -> 'pinata'; 'zipper-mouth' -> 'zipper mouth'."""
    ascii_caption = unicodedata.normalize("NFKD", caption).encode("ascii", "ignore")
    return re.sub(r"[^a-z0-9]+", " ", ascii_caption.decode().lower()).strip()


def test_grinning_face_renders_in_colour_on_white():
    image_HWC = emoji_data.render(GRINNING_FACE, emoji_data.load_font())
    size = emoji_data.IMAGE_SIZE
    assert image_HWC.shape == (size, size, 3) and image_HWC.dtype == np.uint8
    # A yellow face: a large share of strongly coloured pixels.
    assert (_chroma(image_HWC) > 100).mean() > 0.3
    assert (image_HWC[0, 0] == 255).all() and (image_HWC[-1, -1] == 255).all()
    # The measure tells colour from grey: a black square has no chroma.
    black_square = emoji_data.render("\u2b1b", emoji_data.load_font())
    assert (black_square < 128).mean() > 0.3 and _chroma(black_square).max() < 30


def test_render_skips_what_the_font_cannot_draw_as_one_glyph():
    font = emoji_data.load_font()
    assert emoji_data.render("\U0001fae9", font) is None  # Emoji 16: no glyph
    assert emoji_data.render(GRINNING_FACE * 2, font) is None  # two glyphs
    # A ZWJ sequence the font joins is one glyph.
    assert emoji_data.render("\U0001f469\u200d\U0001f52c", font) is not None


def test_captions_name_the_emoji_cldr_name_first():
    assert emoji_data.captions_of(GRINNING_FACE) == ["grinning face", "grinning"]
    # U+263A's Unicode name is WHITE SMILING FACE; CLDR says "smiling face".
    assert emoji_data.captions_of("\u263a\ufe0f") == [
        "smiling face",
        "white smiling face",
        "relaxed",
    ]


def test_features_are_as_documented(emoji_dir, records):
    info = sources.dataset_info("emoji_captions", str(emoji_dir))
    features = info.features
    assert set(features) == {"image", "captions", "emoji", "label"}
    size = emoji_data.IMAGE_SIZE
    assert features["image"].shape == (size, size, 3)
    candidates = emoji_data.candidates()
    assert features["label"].names == [
        emoji_data.captions_of(text)[0] for text in candidates
    ]
    metadata = info.metadata
    assert metadata["candidates"] == len(candidates)
    assert metadata["drawn"] + len(metadata["skipped"]) == len(candidates)
    assert sum(len(records[split]) for split in SPLITS) == metadata["drawn"]
    for record in records["test"]:
        assert isinstance(record["emoji"], str)
        assert features["label"].int2str(record["label"]) == record["captions"][0]
        assert candidates[record["label"]] == record["emoji"]


def test_images_are_drawn_emoji_on_white(records):
    size = emoji_data.IMAGE_SIZE
    for record in records["train"] + records["test"]:
        image_HWC = record["image"]
        assert image_HWC.shape == (size, size, 3), (record["emoji"], image_HWC.shape)
        assert image_HWC.dtype == np.uint8
        assert (image_HWC.min(axis=-1) < 200).sum() >= 16, record["emoji"]
        assert (image_HWC[0, 0] == 255).all(), record["emoji"]


def test_captions_are_strings_with_the_unicode_name(records):
    examples = [r for split in SPLITS for r in records[split]]
    with_unicode_name = 0
    for record in examples:
        captions = record["captions"]
        assert captions and all(isinstance(c, str) for c in captions), captions
        assert all(c == c.lower() for c in captions), captions
        assert len({_words(c) for c in captions}) == len(captions), captions
        code_point = record["emoji"].replace("\ufe0f", "")
        if len(code_point) == 1 and unicodedata.name(code_point, ""):
            name = unicodedata.name(code_point)
            assert _words(name) in {_words(c) for c in captions}, (name, captions)
            with_unicode_name += 1
    assert with_unicode_name > len(examples) / 2
    several = sum(len(r["captions"]) > 1 for r in examples)
    assert several > len(examples) / 3, f"{several} of {len(examples)}"
    grinning = next(r for r in examples if r["emoji"] == GRINNING_FACE)
    assert grinning["captions"] == ["grinning face", "grinning"]


def test_splits_hold_disjoint_emoji_by_their_hash(records):
    emoji_of = {split: {r["emoji"] for r in records[split]} for split in SPLITS}
    for split in SPLITS:
        assert len(emoji_of[split]) == len(records[split])
        assert all(emoji_data.split_of(text) == split for text in emoji_of[split])
    assert not emoji_of["train"] & emoji_of["test"]
    assert not emoji_of["train"] & emoji_of["validation"]
    assert not emoji_of["validation"] & emoji_of["test"]
    total = sum(len(emoji_of[split]) for split in SPLITS)
    assert 0.06 < len(emoji_of["test"]) / total < 0.14
    assert 0.02 < len(emoji_of["validation"]) / total < 0.08
    skin_tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    assert not any(skin_tones & set(text) for text in emoji_of["train"])


def test_missing_font_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_EMOJI_FONT", str(tmp_path / "NotoColorEmoji.ttf"))
    with pytest.raises(
        FileNotFoundError, match="apt-get install fonts-noto-color-emoji"
    ):
        sources.prepare("emoji_captions", str(tmp_path / "data"))
    assert not sources.is_prepared("emoji_captions", str(tmp_path / "data"))
