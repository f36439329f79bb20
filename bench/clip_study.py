"""What does an image-text model learn from a small dataset, and does a
pretrained text tower help?

Two questions, each answered by `fmjax train --config configs/clip.py:small`
runs (printed; each in its own process) whose end-of-training evaluations are
the results:

1. Retrieval of held-out emoji (`emoji_captions`: 1,603 train emoji, the 196
   test emoji never seen in training) by their names, recall@1/5 both ways
   against chance, for
       scratch     both towers from random init
       lit         LiT: the text tower is all-MiniLM-L6-v2, locked
       lit_lora    LiT with LoRA (rank 8) on MiniLM's query/value kernels
       sigmoid     the best of those three again with SigLIP's sigmoid loss
2. Zero-shot transfer to unseen classes: Fashion-MNIST captions made from 7
   class names (templates), zero-shot top-1 on test images of the 3 held-out
   classes (sneaker, bag, ankle boot) among those 3 and among all 10, for
       fashion_scratch   text tower from random init
       fashion_lit       MiniLM text tower, locked

    python bench/clip_study.py                  # every run, then the report
    python bench/clip_study.py --report-only    # report from finished runs
    python bench/clip_study.py --steps 300      # shorter runs

Finished runs (summary.json present) are skipped. Writes docs/image_text.md
(between the RESULTS markers), docs/image_text.json,
docs/image_text_retrieval.png (held-out captions and their top-5 emoji) and
docs/image_text_confusion.png (zero-shot confusion matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"
MINILM = "all-MiniLM-L6-v2"
LIT = {"init.text": MINILM, "adapt.freeze": '("text/.*",)'}
LORA = {
    "init.text": MINILM,
    "adapt.method": "lora",
    "adapt.lora_targets": '("text/.*/(query|value)/kernel",)',
    "adapt.lora_dropout": 0.0,
    "adapt.train_patterns": (
        '("image/.*", "image_proj/.*", "text_proj/.*", "logit_scale", "logit_bias")'
    ),
}
HELD_OUT = (7, 8, 9)  # sneaker, bag, ankle boot
FASHION = {
    "data.name": "fashion_mnist",
    "data.captions": "labels",
    "data.classes": "(0, 1, 2, 3, 4, 5, 6)",
    "data.eval_split": "test",
    "data.vocab_size": 300,
    "data.mean": "(0.286,)",
    "data.std": "(0.353,)",
    "data.augment": "()",
    "model.image.image_size": 28,
    "model.image.patch_size": 4,
    "model.image.channels": 1,
    "zero_shot.template_set": "plain",
}
RUNS = {
    "scratch": {},
    "lit": LIT,
    "lit_lora": LORA,
    "fashion_scratch": FASHION,
    "fashion_lit": {**FASHION, **LIT},
}
LABELS = {
    "scratch": "both towers from scratch",
    "lit": "LiT: locked MiniLM text tower",
    "lit_lora": "LiT + LoRA (r=8) on MiniLM q/v",
    "sigmoid": "SigLIP loss",
    "fashion_scratch": "text tower from scratch",
    "fashion_lit": "locked MiniLM text tower",
}


def command(name: str, overrides: dict, workdir: str, steps: int) -> list[str]:
    values = {
        "train.progress": False,
        "train.steps": steps,
        "train.eval_every": steps // 2,
        "checkpoint.every": steps,
        **overrides,
    }
    return [
        "fmjax", "train", "--config", "configs/clip.py:small", "--workdir", workdir,
        *[f"--config.{k}={v}" for k, v in values.items()],
    ]  # fmt: skip


def run(name: str, overrides: dict, runs_dir: str, steps: int) -> dict:
    workdir = os.path.join(runs_dir, name)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        cmd = command(name, overrides, workdir, steps)
        print("$", shlex.join(cmd), flush=True)
        start = time.time()
        argv = [sys.executable, "-m", "fmjax.cli", *cmd[1:]]
        subprocess.run(argv, cwd=REPO, check=True, env={**os.environ})
        print(f"  {name}: {time.time() - start:.0f} s", flush=True)
    summary = json.load(open(summary_path))
    summary["command"] = shlex.join(
        command(name, overrides, "runs/clip_study/" + name, steps)
    )
    return summary


def retrieval_figure(workdir: str, path: str, queries: int = 6, k: int = 5) -> None:
    """Held-out captions (rows) and the model's top-k test emoji; the right
    one framed green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import fmjax
    from fmjax.data import sources

    m = fmjax.load(workdir)
    test = sources.load_source("emoji_captions", "test")
    images = np.stack([test[i]["image"] for i in range(len(test))])
    image_NE = m.embed_images(images)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(test), queries, replace=False)
    fig, axes = plt.subplots(queries, k, figsize=(1.3 * k + 2.5, 1.3 * queries))
    for row, index in enumerate(picks):
        caption = test[int(index)]["captions"][0]
        ranked = m.retrieve(caption, image_NE, k=k)
        for col, (found, score) in enumerate(ranked):
            ax = axes[row, col]
            ax.imshow(images[found])
            ax.set_xticks([]), ax.set_yticks([])
            colour = "green" if found == index else "lightgrey"
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(3 if found == index else 1)
            ax.set_title(f"{score:.2f}", fontsize=7)
        axes[row, 0].set_ylabel(
            caption, rotation=0, ha="right", va="center", fontsize=8
        )
    fig.suptitle("held-out captions -> top-5 of 196 unseen emoji (green: the one)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_figure(workdir: str, path: str) -> dict:
    """Zero-shot confusion matrix on all Fashion-MNIST test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import fmjax
    from fmjax.data import sources
    from fmjax.eval import retrieval

    m = fmjax.load(workdir)
    info = sources.dataset_info("fashion_mnist")
    names = [n.replace("/", " or ").lower() for n in info.features["label"].names]
    test = sources.load_source("fashion_mnist", "test")
    images = np.stack([test[i]["image"] for i in range(len(test))])
    labels = np.asarray([int(test[i]["label"]) for i in range(len(test))])
    scores = retrieval.zero_shot_scores(
        m.embed_images(images), m.class_embeddings(names, "plain")
    )
    predicted = scores.argmax(axis=1)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(confusion / confusion.sum(axis=1, keepdims=True), cmap="Blues")
    ax.set_xticks(range(10), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(
        range(10),
        [f"{n}{' *' if i in HELD_OUT else ''}" for i, n in enumerate(names)],
        fontsize=8,
    )
    for i in range(10):
        for j in range(10):
            if confusion[i, j]:
                ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=6)
    ax.set_xlabel("zero-shot prediction ('a photo of a {}.')")
    ax.set_title("Fashion-MNIST test, * = class never captioned in training")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"confusion": confusion.tolist(), "names": names}


def _pct(x) -> str:
    return f"{100 * x:.1f}"


def markdown(summaries: dict, steps: int) -> str:
    lines = [
        f"Runs of {steps} steps of batch 128 (configs/clip.py:small), one seed each.",
        "",
        "**Emoji retrieval, 196 held-out emoji (332 captions)** (recall in %):",
        "",
        "| model | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | trainable params | time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    chance = None
    for name in ("scratch", "lit", "lit_lora", "sigmoid"):
        if name not in summaries:
            continue
        s = summaries[name]
        r = s["retrieval"]
        chance = r
        label = LABELS[name] + (f" ({s['sigmoid_of']})" if name == "sigmoid" else "")
        lines.append(
            f"| {label} | {_pct(r['i2t_r@1'])} | {_pct(r['i2t_r@5'])} | "
            f"{_pct(r['t2i_r@1'])} | {_pct(r['t2i_r@5'])} | "
            f"{s['params']['trainable_params']:,} | {s['wall_time_s'] / 60:.0f} min |"
        )
    if chance:
        lines.append(
            "| chance | "
            + " | ".join(
                _pct(chance[f"chance_{k}"])
                for k in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
            )
            + " | | |"
        )
    lines += [
        "",
        "**Zero-shot on Fashion-MNIST test images, trained on captions of 7 classes**"
        " (top-1 in %; 'a photo of a {}.'):",
        "",
        "| text tower | unseen, among the 3 unseen | unseen, among all 10 "
        "| seen classes | all 10,000 images |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("fashion_scratch", "fashion_lit"):
        if name not in summaries:
            continue
        z = summaries[name]["zero_shot"]
        lines.append(
            f"| {LABELS[name]} | "
            + " | ".join(
                _pct(z[k])
                for k in ("unseen_only_top1", "unseen_top1", "seen_top1", "top1")
            )
            + " |"
        )
    lines.append("| chance | 33.3 | 10.0 | 10.0 | 10.0 |")
    lines += ["", "Commands:", "", "```"]
    lines += [summaries[n]["command"] for n in summaries]
    lines += ["```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "clip_study"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    summaries = {}
    for name, overrides in RUNS.items():
        done = os.path.exists(os.path.join(args.runs_dir, name, "summary.json"))
        if args.report_only and not done:
            continue
        summaries[name] = run(name, overrides, args.runs_dir, args.steps)
    emoji = [n for n in ("scratch", "lit", "lit_lora") if n in summaries]
    if emoji:
        best = max(emoji, key=lambda n: summaries[n]["retrieval"]["t2i_r@5"])
        done = os.path.exists(os.path.join(args.runs_dir, "sigmoid", "summary.json"))
        if done or not args.report_only:
            overrides = {**RUNS[best], "objective.loss": "sigmoid"}
            summaries["sigmoid"] = run("sigmoid", overrides, args.runs_dir, args.steps)
            summaries["sigmoid"]["sigmoid_of"] = best
    docs = os.path.join(REPO, "docs")
    extra = {}
    if emoji:
        best = max(
            [n for n in ("scratch", "lit", "lit_lora", "sigmoid") if n in summaries],
            key=lambda n: summaries[n]["retrieval"]["t2i_r@5"],
        )
        retrieval_figure(
            os.path.join(args.runs_dir, best),
            os.path.join(docs, "image_text_retrieval.png"),
        )
        extra["retrieval_figure_run"] = best
    fashion = [n for n in ("fashion_scratch", "fashion_lit") if n in summaries]
    if fashion:
        best = max(fashion, key=lambda n: summaries[n]["zero_shot"]["unseen_only_top1"])
        extra["confusion"] = confusion_figure(
            os.path.join(args.runs_dir, best),
            os.path.join(docs, "image_text_confusion.png"),
        )
        extra["confusion_run"] = best
    results = {
        n: {
            k: s.get(k)
            for k in ("retrieval", "zero_shot", "eval", "wall_time_s", "command")
        }
        for n, s in summaries.items()
    }
    with open(os.path.join(docs, "image_text.json"), "w") as f:
        json.dump({"results": results, **extra, "steps": args.steps}, f, indent=1)
    table = markdown(summaries, args.steps)
    path = os.path.join(docs, "image_text.md")
    text = open(path).read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
