"""What a trained dual encoder is evaluated on after training and by `fmjax
eval`: retrieval recall@k on a held-out split with all its captions, and
zero-shot classification from class names (`fmjax.eval.retrieval`).

    retrieval:  i2t_r@1/5/10, t2i_r@1/5/10 (and chance_* for a random ranking)
    zero_shot:  top1, top5 over all classes; with `data.classes` (training on
                some classes only) also seen_top1 / unseen_top1 over all
                classes and unseen_only_top1 among the unseen classes alone
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fmjax.data import images as image_data
from fmjax.data.captions import readable_label
from fmjax.eval import retrieval
from fmjax.inference.zeroshot import ImageTextEncoder
from fmjax.models.registry import build_model


def encoder_for(task, params, frozen) -> ImageTextEncoder:
    """The trained towers (adapters merged) with the task's tokenizer and
    image preprocessing (the eval pipeline's resize and mean/std)."""
    merged, _ = task.adaptation.merged(params, frozen)
    merged = jax.device_get(merged)

    def preprocess(images):
        config = task.pipeline(batch_size=len(images), seed=0)
        augment = image_data.Augment(
            (), config["image_size"], config["channels"],
            _per_channel(config["mean"], config["channels"]),
            _per_channel(config["std"], config["channels"]),
        )  # fmt: skip
        return np.stack([augment.view(x, None) for x in images])

    return ImageTextEncoder(
        build_model(task.model_config),
        merged,
        task.tokenizer,
        task.text_len,
        preprocess,
    )


def _per_channel(values, channels: int) -> tuple:
    values = tuple(values)
    return values * channels if len(values) == 1 else values


def _split_images(task, encoder, split: str, limit: int = 0):
    """(image embeddings [N, E], records' labels [N] or None, captions per
    image) of a split, un-augmented, in order."""
    source = task._source(split)
    count = min(limit, len(source)) if limit else len(source)
    records = [source[i] for i in range(count)]  # read (and decoded) once
    batches = image_data.make_image_iterator(
        records,
        **task.pipeline(
            batch_size=min(task.batch_size, 256),
            seed=0,
            shuffle=False,
            repeat=False,
            drop_remainder=False,
        ),
    )
    embeds, labels = [], []
    for batch in batches:
        real = batch["weights"] > 0
        embeds.append(encoder.embed_pixels(batch["images"])[real])
        labels.append(batch["labels"][real])
    captions = [] if task.from_labels else [
        task.caption_tokens(draw=False).captions(record) for record in records
    ]  # fmt: skip
    return np.concatenate(embeds), np.concatenate(labels), captions


@dataclasses.dataclass(frozen=True)
class RetrievalEvaluator:
    """Image->text and text->image recall@k over every caption of a split."""

    name: str = "retrieval"

    def __call__(self, context) -> dict:
        task = context.task
        settings = task.config.retrieval
        if jax.process_count() > 1:
            return {}
        encoder = encoder_for(task, context.params, context.frozen)
        split = settings.split or task.eval_split
        image_NE, _, captions = _split_images(task, encoder, split, settings.limit)
        texts = [c for caps in captions for c in caps]
        text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        ks = tuple(settings.ks)
        out = retrieval.recall_at_k(
            image_NE, encoder.embed_texts(texts), text_image, ks
        )
        for k in ks:
            chance = retrieval.chance_recall(
                len(captions), [len(c) for c in captions], k
            )
            out.update({f"chance_{key}": value for key, value in chance.items()})
        out.update(
            images=len(captions), texts=len(texts), logit_scale=encoder.logit_scale
        )
        return out


@dataclasses.dataclass(frozen=True)
class ZeroShotEvaluator:
    """Top-1/top-5 of zero-shot classification of a labelled split from
    class names (`zero_shot.class_names` or the data's) and templates."""

    name: str = "zero_shot"

    def __call__(self, context) -> dict:
        task = context.task
        settings = task.config.zero_shot
        if jax.process_count() > 1:
            return {}
        encoder = encoder_for(task, context.params, context.frozen)
        split = settings.split or task.eval_split
        names = tuple(settings.class_names) or task.label_names
        templates = tuple(settings.templates) or settings.template_set
        image_NE, labels, _ = _split_images(task, encoder, split, settings.limit)
        # Names as the training captions spell them (the data's label names).
        if not settings.class_names:
            names = tuple(readable_label(n) for n in names)
        class_CE = encoder.class_embeddings(list(names), templates)
        scores_NC = retrieval.zero_shot_scores(image_NE, class_CE)
        out = retrieval.topk_accuracy(scores_NC, labels, (1, 5))
        predicted = np.argmax(scores_NC, axis=1)
        seen = tuple(int(c) for c in task.config.data.classes)
        if seen:
            unseen = [c for c in range(len(names)) if c not in seen]
            is_seen = np.isin(labels, seen)
            out["seen_top1"] = float(np.mean(predicted[is_seen] == labels[is_seen]))
            rows = ~is_seen
            out["unseen_top1"] = float(np.mean(predicted[rows] == labels[rows]))
            among = np.asarray(unseen)[np.argmax(scores_NC[rows][:, unseen], axis=1)]
            out["unseen_only_top1"] = float(np.mean(among == labels[rows]))
            out["unseen_only_chance"] = 1.0 / len(unseen)
        out.update(images=int(len(labels)), classes=len(names), chance=1.0 / len(names))
        return out
