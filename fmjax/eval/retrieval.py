"""Zero-shot classification and retrieval from embeddings (dual encoders).

    zero_shot_scores(image_ND, class_CE)          # [N, C] cosine similarities
    topk_accuracy(scores_NC, labels_N, ks=(1, 5)) # {"top1": ..., "top5": ...}
    recall_at_k(image_ND, text_MD, text_image_M, ks=(1, 5, 10))
    class_embeddings(embed_texts, class_names, templates)

Embeddings are L2-normalised here, whatever the caller passes. Retrieval
follows CLIP's and open_clip's protocol on a split with several captions per
image: image->text recall@k is the fraction of images with at least one of
their own captions among the k best texts; text->image recall@k the fraction
of captions whose image is among the k best images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def normalise(x_ND) -> np.ndarray:
    x_ND = np.asarray(x_ND, np.float32)
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


def class_embeddings(
    embed_texts: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """[C, E]: per class, the mean of its normalised template embeddings,
    normalised again (CLIP's prompt ensemble). A template holds one `{}`."""
    if not class_names:
        raise ValueError("class_names is empty: expected at least one class")
    if not templates:
        raise ValueError("templates is empty: expected at least one, such as '{}'")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(
                f"template {template!r}: expected exactly one '{{}}' where the class "
                "name goes"
            )
    texts = [t.format(c) for c in class_names for t in templates]
    embedded = normalise(embed_texts(texts))
    per_class = embedded.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return normalise(per_class)


def zero_shot_scores(image_ND, class_CE) -> np.ndarray:
    return normalise(image_ND) @ normalise(class_CE).T


def topk_accuracy(scores_NC, labels_N, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top{k}": fraction whose label is among the k best classes} for each k
    up to the number of classes."""
    scores_NC, labels_N = np.asarray(scores_NC), np.asarray(labels_N)
    if scores_NC.ndim != 2 or labels_N.shape != scores_NC.shape[:1]:
        raise ValueError(
            f"scores {scores_NC.shape} and labels {labels_N.shape}: expected "
            "[N, C] and [N]"
        )
    order_NC = np.argsort(-scores_NC, axis=1, kind="stable")
    out = {}
    for k in ks:
        if k <= scores_NC.shape[1]:
            hit = (order_NC[:, :k] == labels_N[:, None]).any(axis=1)
            out[f"top{k}"] = float(hit.mean())
    return out


def recall_at_k(
    image_ND, text_MD, text_image_M, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{"i2t_r@k", "t2i_r@k"} for each k; `text_image_M[m]` is the index of
    caption m's image. Ties are broken by index (stable sort)."""
    image_ND, text_MD = normalise(image_ND), normalise(text_MD)
    text_image_M = np.asarray(text_image_M)
    if text_image_M.shape != text_MD.shape[:1]:
        raise ValueError(
            f"text_image has shape {text_image_M.shape}; expected one image index "
            f"per text ({text_MD.shape[0]})"
        )
    if len(text_image_M) and (
        text_image_M.min() < 0 or text_image_M.max() >= len(image_ND)
    ):
        raise ValueError(
            f"text_image holds indices outside [0, {len(image_ND)}): "
            f"{text_image_M.min()}..{text_image_M.max()}"
        )
    sims_NM = image_ND @ text_MD.T
    i2t_order = np.argsort(-sims_NM, axis=1, kind="stable")  # texts per image
    t2i_order = np.argsort(-sims_NM.T, axis=1, kind="stable")  # images per text
    own_NM = text_image_M[None, :] == np.arange(len(image_ND))[:, None]
    out = {}
    for k in ks:
        top_texts = np.take_along_axis(own_NM, i2t_order[:, :k], axis=1)
        out[f"i2t_r@{k}"] = float(top_texts.any(axis=1).mean())
        out[f"t2i_r@{k}"] = float(
            (t2i_order[:, :k] == text_image_M[:, None]).any(axis=1).mean()
        )
    return out


def chance_recall(num_images: int, captions_per_image: Sequence[int], k: int) -> dict:
    """Expected recall@k of random rankings (the baseline to beat)."""
    counts = np.asarray(captions_per_image)
    texts = int(counts.sum())
    # i2t: 1 - P(none of an image's c captions among k random of `texts`).
    miss = []
    for c in counts:
        p = 1.0
        for j in range(min(k, texts)):
            p *= max(texts - c - j, 0) / (texts - j)
        miss.append(p)
    return {
        f"i2t_r@{k}": float(1 - np.mean(miss)),
        f"t2i_r@{k}": min(k, num_images) / num_images,
    }
