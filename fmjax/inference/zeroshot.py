"""Using a dual encoder (CLIP, SigLIP, LiT): embed images and texts, classify
images zero-shot from class names, retrieve across modalities.

    m = fmjax.load("runs/clip")           # or an HF CLIP directory
    m.embed_images(uint8_images)          # [N, E] unit vectors
    m.embed(["a red apple", ...])         # [M, E] unit vectors
    m.zero_shot(images, ["cat", "dog"])   # [{"label": "cat", "score": ...}, ...]
    m.retrieve("a red apple", images, k=5)  # [(index, score), ...] best first

Zero-shot classification embeds every class name in every template ("a photo
of a {}."), averages each class's normalised embeddings and normalises again
(CLIP's prompt ensemble), then takes the softmax of the scaled cosines. The
template sets of CLIP ship: `TEMPLATES["clip"]` (OpenAI's 80 ImageNet
templates), `TEMPLATES["simple"]` (the 7 of its prompt-engineering notebook)
and `TEMPLATES["plain"]` ("a photo of a {}.").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fmjax.data.captions import encode_captions
from fmjax.eval import retrieval

# OpenAI CLIP's ImageNet prompt templates (as open_clip's zero_shot_metadata).
CLIP_TEMPLATES = tuple(
    f"{t}."
    for t in """a bad photo of a {}|a photo of many {}|a sculpture of a {}
|a photo of the hard to see {}|a low resolution photo of the {}|a rendering of a {}
|graffiti of a {}|a bad photo of the {}|a cropped photo of the {}|a tattoo of a {}
|the embroidered {}|a photo of a hard to see {}|a bright photo of a {}
|a photo of a clean {}|a photo of a dirty {}|a dark photo of the {}|a drawing of a {}
|a photo of my {}|the plastic {}|a photo of the cool {}|a close-up photo of a {}
|a black and white photo of the {}|a painting of the {}|a painting of a {}
|a pixelated photo of the {}|a sculpture of the {}|a bright photo of the {}
|a cropped photo of a {}|a plastic {}|a photo of the dirty {}
|a jpeg corrupted photo of a {}|a blurry photo of the {}|a photo of the {}
|a good photo of the {}|a rendering of the {}|a {} in a video game|a photo of one {}
|a doodle of a {}|a close-up photo of the {}|a photo of a {}|the origami {}
|the {} in a video game|a sketch of a {}|a doodle of the {}|a origami {}
|a low resolution photo of a {}|the toy {}|a rendition of the {}
|a photo of the clean {}|a photo of a large {}|a rendition of a {}
|a photo of a nice {}|a photo of a weird {}|a blurry photo of a {}|a cartoon {}
|art of a {}|a sketch of the {}|a embroidered {}|a pixelated photo of a {}
|itap of the {}|a jpeg corrupted photo of the {}|a good photo of a {}|a plushie {}
|a photo of the nice {}|a photo of the small {}|a photo of the weird {}
|the cartoon {}|art of the {}|a drawing of the {}|a photo of the large {}
|a black and white photo of a {}|the plushie {}|a dark photo of a {}|itap of a {}
|graffiti of the {}|a toy {}|itap of my {}|a photo of a cool {}
|a photo of a small {}|a tattoo of the {}""".replace("\n", "").split("|")
)
SIMPLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TEMPLATES = {
    "clip": CLIP_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "plain": ("a photo of a {}.",),
    "name": ("{}",),
}


def resolve_templates(templates) -> tuple[str, ...]:
    """A set's name (`TEMPLATES`) or the templates themselves."""
    if templates is None:
        return SIMPLE_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATES:
            return TEMPLATES[templates]
        if "{}" not in templates:
            raise ValueError(
                f"templates={templates!r}: expected one of {sorted(TEMPLATES)} or "
                "templates holding '{}'"
            )
        return (templates,)
    return tuple(templates)


class ImageTextEncoder:
    """Jitted towers of a DualEncoder (merged params) with its tokenizer.
    `preprocess(uint8 images) -> float images` is the model's own (the training
    config's resize and mean/std, or an HF CLIP's processor)."""

    def __init__(
        self,
        module,
        params,
        tokenizer,
        text_len: int,
        preprocess: Callable[[np.ndarray], np.ndarray],
    ):
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.text_len = text_len
        self.preprocess = preprocess

    @functools.cached_property
    def _image_fn(self):
        module = self.module
        return jax.jit(
            lambda p, x: module.apply({"params": p}, x, method="encode_images")
        )

    @functools.cached_property
    def _text_fn(self):
        module = self.module
        return jax.jit(
            lambda p, t, s: module.apply({"params": p}, t, s, method="encode_texts")
        )

    @classmethod
    def from_config(cls, module, params, tokenizer, config) -> ImageTextEncoder:
        """For `fmjax.load`: images preprocessed as the run's config says (an
        HF CLIP's `image_processor`, else data.mean / data.std at the image
        tower's size), captions cut to its data.text_len."""
        from fmjax.data.images import _resize, to_float

        image = module.config.image
        data = config.get("data", {})
        processor = config.get("image_processor")
        if hasattr(processor, "to_dict"):  # a ConfigDict
            processor = processor.to_dict()
        mean = np.resize(
            np.asarray(data.get("mean", (0.5,)), np.float32), image.channels
        )
        std = np.resize(np.asarray(data.get("std", (0.5,)), np.float32), image.channels)

        def preprocess(images) -> np.ndarray:
            if processor:
                from fmjax.convert.clip import preprocess_images

                return preprocess_images(list(images), processor)
            return np.stack(
                [(_resize(to_float(x, image.channels), image.image_size) - mean) / std
                 for x in images]
            ).astype(np.float32)  # fmt: skip

        text_len = data.get("text_len", 0) or module.config.text.max_len
        encoder = cls(module, params, tokenizer, text_len, preprocess)
        encoder.config = config
        return encoder

    def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[M, E] unit text embeddings (`embed_texts`; `Model.embed`'s name)."""
        return self.embed_texts(texts, batch_size)

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def embed_pixels(self, images_NHWC, batch_size: int = 256) -> np.ndarray:
        """[N, E] of images already preprocessed (float, the model's size)."""
        out = [
            np.asarray(self._image_fn(self.params, images_NHWC[i : i + batch_size]))
            for i in range(0, len(images_NHWC), batch_size)
        ]
        return (
            np.concatenate(out) if out else np.zeros((0, self.module.config.embed_dim))
        )

    def embed_images(self, images, batch_size: int = 64) -> np.ndarray:
        """[N, E] unit vectors of uint8 images [N, H, W, C] (or [N, H, W])."""
        images = np.asarray(images)
        if images.ndim not in (3, 4) or images.dtype != np.uint8:
            raise ValueError(
                f"images of shape {images.shape} and dtype {images.dtype}; expected "
                "uint8 [N, H, W, C] or [N, H, W]"
            )
        out = [
            self.embed_pixels(self.preprocess(images[i : i + batch_size]), batch_size)
            for i in range(0, len(images), batch_size)
        ]
        return (
            np.concatenate(out) if out else np.zeros((0, self.module.config.embed_dim))
        )

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[M, E] unit vectors of texts (cut to the model's text length)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got one string")
        out = []
        for i in range(0, len(texts), batch_size):
            tokens, segments = encode_captions(
                self.tokenizer, list(texts[i : i + batch_size]), self.text_len
            )
            out.append(np.asarray(self._text_fn(self.params, tokens, segments)))
        return (
            np.concatenate(out) if out else np.zeros((0, self.module.config.embed_dim))
        )

    def class_embeddings(self, class_names, templates=None) -> np.ndarray:
        return retrieval.class_embeddings(
            self.embed_texts, list(class_names), resolve_templates(templates)
        )

    def zero_shot(self, images, class_names, templates=None, top_k: int = 1):
        """Per image, the `top_k` classes [{"label", "score"}] by the softmax of
        scaled cosines to the class embeddings."""
        class_CE = self.class_embeddings(class_names, templates)
        logits_NC = self.logit_scale * retrieval.zero_shot_scores(
            self.embed_images(images), class_CE
        )
        probs_NC = np.asarray(jax.nn.softmax(logits_NC, axis=-1))
        out = []
        for row in probs_NC:
            best = np.argsort(-row, kind="stable")[:top_k]
            picks = [{"label": class_names[c], "score": float(row[c])} for c in best]
            out.append(picks[0] if top_k == 1 else picks)
        return out

    def retrieve(self, query, collection, k: int = 5) -> list[tuple[int, float]]:
        """The `k` items of `collection` nearest to `query` as (index, cosine),
        best first. A text query searches images (uint8 [N, H, W, C] or their
        embeddings [N, E]); an image query (uint8 [H, W, C]) searches texts (a
        list of strings or their embeddings)."""
        if isinstance(query, str):
            q_E = self.embed_texts([query])[0]
            items = np.asarray(collection)
            items_NE = items if items.dtype != np.uint8 else self.embed_images(items)
        else:
            q_E = self.embed_images(np.asarray(query)[None])[0]
            if len(collection) and isinstance(collection[0], str):
                items_NE = self.embed_texts(list(collection))
            else:
                items_NE = np.asarray(collection, np.float32)
        scores_N = retrieval.normalise(items_NE) @ q_E
        best = np.argsort(-scores_N, kind="stable")[:k]
        return [(int(i), float(scores_N[i])) for i in best]
