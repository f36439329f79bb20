"""Emoji captions: colour pictures of emoji, each with its English names.

    source = sources.load_source("emoji_captions", "train")
    source[i]  # e.g. {"image": uint8 [64, 64, 3], "emoji": "😀", "label": ...,
               #       "captions": ["grinning face", "grinning"]}

Features:
  image     uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] = [64, 64, 3], RGB on white: the
            emoji drawn by Noto Color Emoji (Debian's fonts-noto-color-emoji) at
            its 109-pixel bitmap strike, its 136x128 glyph cell centred on a
            white square and shrunk with a Lanczos filter. Every emoji keeps the
            font's scale (small symbols stay small).
  captions  its names as lower-case words, at least one, without repeats that
            differ only in punctuation, accents or case: the CLDR short name
            (`emoji` package, ':grinning_face:' -> 'grinning face') first, then
            the Unicode character name of a single-code-point emoji
            (`unicodedata`, 'grinning face' again, so dropped; '☺️' gives 'white
            smiling face'; Python 3.11 knows Unicode 14.0, so newer emoji have
            none), then the `emoji` package's aliases ('grinning').
            No templates ("an emoji of ..."): they carry nothing about the
            picture, and a pipeline can add them.
  emoji     the emoji's string (fully qualified, with any U+FE0F).
  label     ClassLabel named by the CLDR short names of all candidates (below),
            sorted; so an id does not depend on which emoji the font draws.

Which emoji: the fully-qualified emoji of `emoji.EMOJI_DATA` (Unicode's
emoji-test list) except components and skin-tone variants (U+1F3FB-U+1F3FF:
near-duplicates of the default-tone emoji, which would put one picture in both
train and test). Of those candidates, one the font does not draw as a single
glyph is skipped: a render without ink (an emoji newer than the font) or one
wider than a glyph (a ZWJ or flag sequence that the font, or Pillow without
libraqm, does not join). Flags, keycaps and ZWJ sequences (families, 'woman
scientist') that it joins are kept. The build records the counts and the
skipped emoji in `info.metadata`.

Splits are disjoint in emoji: the md5 of an emoji's string puts it in `test`
(10%), `validation` (5%) or `train`, whichever others render.

With emoji 2.16.0, Debian 12's font (2.042, Emoji 15.1), Pillow with raqm and
Python 3.11: 1,923 candidates, 1,899 drawn (the 24 skipped are Emoji 16.0 and
later); train / validation / test hold 1,603 / 100 / 196 emoji with 2,701 / 166
/ 332 captions (about half the emoji have one caption, the rest two to five).
The build takes about 3 s on one CPU core.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
import unicodedata

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

IMAGE_SIZE = 64  # pixels per side of `image`
# Debian's fonts-noto-color-emoji; $FMJAX_EMOJI_FONT overrides.
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_FONT_SIZE = 109  # the font's only bitmap strike (CBDT): 136x128 pixel glyphs
_SPLIT_PERCENT = {"test": 10, "validation": 5}  # the rest is train
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))


def font_path() -> pathlib.Path:
    """The emoji font: $FMJAX_EMOJI_FONT, else Debian's Noto Color Emoji."""
    path = pathlib.Path(os.environ.get("FMJAX_EMOJI_FONT", EMOJI_FONT))
    if not path.is_file():
        raise FileNotFoundError(
            f"emoji_captions needs the Noto Color Emoji font at {str(path)!r}: "
            "install Debian's package (sudo apt-get install "
            "fonts-noto-color-emoji) or set $FMJAX_EMOJI_FONT to a CBDT colour "
            "emoji font file"
        )
    return path


def load_font(path: str | os.PathLike | None = None):
    """The emoji font at its bitmap size, as a Pillow FreeTypeFont."""
    from PIL import ImageFont

    return ImageFont.truetype(os.fspath(path or font_path()), _FONT_SIZE)


def _words(name: str) -> str:
    """':A_button_(blood_type):' -> 'a button (blood type)'."""
    return name.strip(":").replace("_", " ").lower()


def _dedup_key(caption: str) -> str:
    """'zipper-mouth face' -> 'zipper mouth face', "o’clock" -> 'oclock',
    'piñata' -> 'pinata': spellings of one name share a key."""
    letters = unicodedata.normalize("NFKD", caption.lower())
    letters = "".join(c for c in letters if not unicodedata.combining(c))
    letters = letters.replace("'", "").replace("\u2019", "")
    return re.sub(r"[\W_]+", " ", letters).strip()


def candidates() -> list[str]:
    """Fully-qualified emoji without components or skin tones, by CLDR name."""
    from emoji import EMOJI_DATA, STATUS

    chosen = [
        text
        for text, data in EMOJI_DATA.items()
        if data["status"] == STATUS["fully_qualified"]
        and not _SKIN_TONES.intersection(text)
    ]
    return sorted(chosen, key=lambda text: _words(EMOJI_DATA[text]["en"]))


def captions_of(text: str) -> list[str]:
    """CLDR name, Unicode name (single code points), aliases; no near-repeats."""
    from emoji import EMOJI_DATA

    data = EMOJI_DATA[text]
    names = [_words(data["en"])]
    code_point = text.replace("\ufe0f", "")
    if len(code_point) == 1:
        # Python's Unicode database may be older than the emoji: then no name.
        name = unicodedata.name(code_point, "")
        if name:
            names.append(name.lower())
    names += [_words(alias) for alias in data.get("alias", ())]
    kept = {}
    for name in names:
        kept.setdefault(_dedup_key(name), name)
    return list(kept.values())


def split_of(text: str) -> str:
    """'test' for 10% of emoji, 'validation' 5%, else 'train' (md5 of text)."""
    bucket = int(hashlib.md5(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    bound = 0
    for split, percent in _SPLIT_PERCENT.items():
        bound += percent
        if bucket < bound:
            return split
    return "train"


def render(text: str, font, size: int = IMAGE_SIZE) -> np.ndarray | None:
    """`text` as uint8 RGB [size, size, 3] on white, or None when the font
    draws it as no glyph (no ink) or as more than one (an unjoined sequence)."""
    from PIL import Image, ImageDraw

    cell = font.getlength("\U0001f600")  # every glyph has this advance
    if font.getlength(text) > cell:
        return None
    _, _, width, height = font.getbbox("\U0001f600")  # the glyph cell
    glyph = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return None
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(
        glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2)
    )
    image = square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    image_HWC = np.asarray(image)
    assert image_HWC.shape == (size, size, 3), image_HWC.shape
    return image_HWC


def _png(image_HWC: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


class EmojiCaptions(tfds.core.GeneratorBasedBuilder):
    """Emoji drawn by Noto Color Emoji, with their English names as captions
    (see `fmjax.data.emoji`): 64x64 RGB images; train, validation and test
    hold disjoint emoji."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Noto Color Emoji renders; names from the emoji package."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As sources.BbcNews: no checksums file to find through importlib.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        from emoji import EMOJI_DATA

        names = [_words(EMOJI_DATA[text]["en"]) for text in candidates()]
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "emoji": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=names),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/googlefonts/noto-emoji",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The font is a Debian package, the names a pip package.
        font = load_font()
        texts = candidates()
        images, skipped = {}, []
        for text in texts:
            image_HWC = render(text, font)
            if image_HWC is None:
                skipped.append(text)
            else:
                images[text] = image_HWC
        self.info.metadata.update(
            candidates=len(texts), drawn=len(images), skipped=skipped
        )
        label_of = {text: index for index, text in enumerate(texts)}
        return {
            split: self._generate_examples(images, label_of, split)
            for split in ("train", "validation", "test")
        }

    def _generate_examples(self, images, label_of, split):
        for text, image_HWC in images.items():
            if split_of(text) == split:
                yield (
                    text,
                    {
                        "image": _png(image_HWC),
                        "captions": captions_of(text),
                        "emoji": text,
                        "label": label_of[text],
                    },
                )
