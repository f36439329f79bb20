"""Do self-supervised ViTs learn features that need few labels?

Fashion-MNIST (Debian's dataset-fashion-mnist), the `small` ViT (4 layers,
d=128, 4x4 patches), no labels during pre-training. Each method is one
`fmjax train` command (printed; run in its own process), whose end-of-training
evaluation of the frozen encoder is the result (the runs, each a config and
its overrides, and their labels: bench/vision_runs.py).

Every representation gets the same evaluators (`fmjax.eval.features`) on all
60,000 training images and the 10,000 test images: few-shot ridge at
1/5/10/25 shots per class over 3 seeds, k-NN with all labels and with 1% of
them, and a linear probe with all labels. Plus the mechanism checks: MAE's
held-out masked loss against predicting each patch's mean, DINO's loss and
teacher entropy against ln(K), SimCLR's positive-pair top-1 against chance.
Each self-supervised run also evaluates its frozen features 4 times along the
way (`train.evaluators_every`): the curve of accuracy against steps.

    python bench/vision_study.py                  # every run, then the report
    python bench/vision_study.py --report-only    # report from finished runs
    python bench/vision_study.py --methods mae dino

Finished runs (summary.json present) are skipped, so an interrupted study
resumes. Writes docs/vision.md (between the RESULTS markers), docs/vision.json,
docs/vision_accuracy.png, docs/vision_curve.png and docs/vision_mae.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np
from vision_runs import (
    BASELINES,
    DINO_RUNS,
    LABELS,
    RUNS,
    SEEDS,
    SELF_SUPERVISED,
    SHOTS,
    SIMCLR_RUNS,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PCA_DIM = 64
CURVE_POINTS = 4  # frozen-feature evaluations per run, the last at its end
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"


def command(method: str, workdir: str) -> list[str]:
    from fmjax.config import load_config

    config, extra = RUNS[method]
    overrides = {
        "features.train_examples": 0,  # all 60,000
        "features.knn_fractions": "(0.01,)",
        "train.progress": False,
        **extra,
    }
    steps = load_config(
        os.path.join(REPO, "configs", f"{config}.py:small"),
        [f"--config.{k}={v}" for k, v in extra.items()],
    ).train.steps
    if steps >= CURVE_POINTS:  # the frozen features along the way too: the curve
        overrides["train.evaluators_every"] = steps // CURVE_POINTS
    return [
        sys.executable, "-m", "fmjax.cli", "train",
        "--config", f"configs/{config}.py:small", "--workdir", workdir,
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]  # fmt: skip


def run(method: str, runs_dir: str) -> dict:
    workdir = os.path.join(runs_dir, method)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        cmd = command(method, workdir)
        print("$", shlex.join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ})
        print(f"  {method}: {time.time() - start:.0f} s", flush=True)
    return json.load(open(summary_path))


def _pixels(split: str, limit: int = 0):
    from fmjax.data import sources

    source = sources.load_source("fashion_mnist", split)
    count = len(source) if not limit else min(limit, len(source))
    images = np.stack([source[i]["image"] for i in range(count)])
    labels = np.array([source[i]["label"] for i in range(count)])
    return images.astype(np.float32) / 255.0, labels


def pixel_baselines() -> dict[str, dict]:
    """The evaluators on normalised pixels and on their PCA."""
    from fmjax.eval import features

    train, train_labels = _pixels("train")
    test, test_labels = _pixels("test")
    flat = lambda x: ((x - 0.286) / 0.353).reshape(len(x), -1)  # noqa: E731
    representations = {"pixels": (flat(train), flat(test))}
    representations["pca"] = features.pca_features(*representations["pixels"], PCA_DIM)
    return {
        name: features.feature_report(
            tr, train_labels, te, test_labels, 10, SHOTS, SEEDS, (0.01,)
        )
        for name, (tr, te) in representations.items()
    }


def mean_patch_loss(patch: int = 4) -> float:
    """MAE's normalised-pixel loss of predicting every patch's own mean (0
    after normalisation), averaged over the test set's patches: the loss of a
    model that learned nothing about shapes (masks are uniform, so the
    average over all patches is its expectation)."""
    from fmjax.models.vision import patchify

    test, _ = _pixels("test")
    patches = np.asarray(patchify(test, patch))
    var = patches.var(axis=-1)
    return float(np.mean(var / (var + 1e-6)))


def _records(workdir: str, split: str = "eval") -> list[dict]:
    """The run's metrics.jsonl records of `split`, in step order."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == split]


def mechanism_checks(runs_dir: str, summaries: dict) -> dict:
    from fmjax.export import load_export_config

    checks = {}
    if "mae" in summaries:
        checks["mae"] = {
            "eval_masked_loss": summaries["mae"]["eval"]["loss"],
            "predict_patch_mean_loss": mean_patch_loss(),
        }
    for name in DINO_RUNS:
        if name not in summaries:
            continue
        config = load_export_config(os.path.join(runs_dir, name))
        final = summaries[name]["eval"]
        checks[name] = {
            "eval_loss": final["loss"],
            "teacher_entropy": final["teacher_entropy"],
            "ln_prototypes": math.log(config["model"]["prototypes"]),
            "eval_curve": [
                (r["step"], r["loss"], r["teacher_entropy"])
                for r in _records(os.path.join(runs_dir, name))
            ],
        }
    for name in SIMCLR_RUNS:
        if name not in summaries:
            continue
        config = load_export_config(os.path.join(runs_dir, name))
        batch = config["data"]["batch_size"]
        checks[name] = {
            "positive_top1": summaries[name]["eval"]["contrastive_accuracy"],
            "chance": 1 / (2 * batch - 1),
            "eval_loss": summaries[name]["eval"]["loss"],
        }
    return checks


def mae_figure(workdir: str, path: str, count: int = 8) -> None:
    """Test images, what the MAE encoder saw (75% of patches hidden) and its
    reconstruction (visible patches pasted back, as the MAE paper shows)."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmjax.export import find_export, load_export
    from fmjax.models import build_model, model_config
    from fmjax.tasks.vision import mae_reconstruct

    params, config = load_export(find_export(workdir))
    cfg = model_config(config["model"])
    images, _ = _pixels("test", count)
    data = config["data"]
    x = (images - data["mean"][0]) / data["std"][0]  # [N, 28, 28, 1]
    noise = jax.random.uniform(jax.random.key(0), (count, cfg.num_patches))
    ratio = config["objective"]["mask_ratio"]
    masked, pasted = mae_reconstruct(build_model(cfg), params, x, noise, ratio)
    rows = {"test image": x, "encoder input (25%)": masked, "reconstruction": pasted}
    fig, axes = plt.subplots(3, count, figsize=(count * 1.2, 4))
    for r, (name, batch) in enumerate(rows.items()):
        for c in range(count):
            axes[r, c].imshow(np.asarray(batch[c, ..., 0]), cmap="gray")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def figure_runs(results: dict) -> list[str]:
    """The self-supervised runs the figures draw: each method's config run
    and, where another run of the method is better at 10 shots, its best."""
    shown = []
    for method in ("mae", "simclr", "dino"):
        runs = [n for n in SELF_SUPERVISED if n.startswith(method) and n in results]
        best = max(runs, key=lambda n: results[n]["fewshot_10_accuracy"], default=None)
        shown += [n for n in dict.fromkeys((method, best)) if n in results]
    return shown


def accuracy_figure(results: dict, path: str) -> None:
    """Accuracy against labels per class: `figure_runs`, supervised training
    and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {*figure_runs(results), "supervised", *BASELINES}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, report in results.items():
        if name not in shown:
            continue
        xs = list(SHOTS) + [6000]
        ys = [report[f"fewshot_{s}_accuracy"] for s in SHOTS]
        ys.append(report["linear_probe_accuracy"])
        style = (
            "-o" if name in SELF_SUPERVISED else "--s" if name in BASELINES else ":^"
        )
        ax.plot(xs, ys, style, label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples per class (1-25: ridge; 6,000: linear probe)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fashion-MNIST: frozen features of a small ViT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def feature_curves(runs_dir: str, methods) -> dict[str, list[dict]]:
    """Each run's frozen-feature evaluations by step (`train.evaluators_every`
    along the way, then the end), for runs that have more than the last."""
    curves = {}
    for name in methods:
        points = _records(os.path.join(runs_dir, name), "features")
        if len(points) > 1:
            curves[name] = points
    return curves


def curve_figure(curves: dict, results: dict, path: str) -> None:
    """10-shot accuracy, k-NN's with 1% of the labels and the linear probe's
    against pre-training steps for `figure_runs`, beside the best baseline
    and the target (5 points above it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_baseline(results)
    panels = (
        ("fewshot_10_accuracy", "10-shot ridge"),
        ("knn_1pct_accuracy", "k-NN, 1% of the labels"),
        ("linear_probe_accuracy", "linear probe"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in figure_runs(results):
            if name not in curves:
                continue
            points = curves[name]
            steps = [p["step"] for p in points]
            values = [p[key] for p in points]
            if "random" in results:  # the same ViT at step 0
                steps, values = [0, *steps], [results["random"][key], *values]
            ax.plot(steps, [100 * v for v in values], "-o", label=LABELS[name])
        level = 100 * results[best][key]
        ax.axhline(level, color="grey", ls="--", label=LABELS[best])
        if key == "fewshot_10_accuracy":
            ax.axhline(level + 5, color="red", ls=":", label="target: +5 points")
        ax.set_title(title)
        ax.set_xlabel("pre-training step (0: random init)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Fashion-MNIST: frozen features along pre-training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _best_baseline(results: dict) -> str:
    present = [n for n in BASELINES if n in results]  # pixels and pca always
    return max(present, key=lambda n: results[n]["fewshot_10_accuracy"])


def _fmt(report: dict, key: str) -> str:
    return f"{100 * report[key]:.1f}"


def markdown(results: dict, checks: dict, times: dict, curves: dict) -> str:
    lines = [
        "| representation | 10-shot ridge (3 seeds) | 1-shot | 25-shot "
        "| k-NN, 1% labels | k-NN, all | linear probe, all | pre-training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ten = f"{_fmt(r, 'fewshot_10_accuracy')} ± {100 * r['fewshot_10_std']:.1f}"
        lines.append(
            f"| {LABELS[name]} | {ten} | {_fmt(r, 'fewshot_1_accuracy')} | "
            f"{_fmt(r, 'fewshot_25_accuracy')} | {_fmt(r, 'knn_1pct_accuracy')} | "
            f"{_fmt(r, 'knn_accuracy')} | {_fmt(r, 'linear_probe_accuracy')} | "
            f"{times.get(name, '-')} |"
        )
    best = _best_baseline(results)
    base = results[best]
    lines += ["", f"Target: 10-shot accuracy >= 5 points above the best baseline "
              f"({LABELS[best]}, {_fmt(base, 'fewshot_10_accuracy')}) and by more than "
              "3 seed standard deviations:", ""]  # fmt: skip
    for name in SELF_SUPERVISED:
        if name not in results:
            continue
        r = results[name]
        gap = 100 * (r["fewshot_10_accuracy"] - base["fewshot_10_accuracy"])
        spread = 100 * max(r["fewshot_10_std"], base["fewshot_10_std"])
        met = gap >= 5 and gap > 3 * spread
        lines.append(
            f"- {LABELS[name]}: {gap:+.1f} points (3 std = {3 * spread:.1f}): "
            f"{'met' if met else 'missed'}"
        )
    if curves:
        head = "Along pre-training (10-shot / k-NN with 1% of the labels / linear"
        lines += ["", f"{head} probe by step; step 0 is the random-init row):", ""]
    for name, points in curves.items():
        by_step = ", ".join(
            f"{p['step']}: {_fmt(p, 'fewshot_10_accuracy')} / "
            f"{_fmt(p, 'knn_1pct_accuracy')} / {_fmt(p, 'linear_probe_accuracy')}"
            for p in points
        )
        lines.append(f"- {LABELS[name]}: {by_step}.")
    lines += ["", "Mechanism checks (held-out test split):", ""]
    if "mae" in checks:
        c = checks["mae"]
        lines.append(
            f"- MAE masked-patch loss {c['eval_masked_loss']:.3f} vs "
            f"{c['predict_patch_mean_loss']:.3f} for predicting each patch's mean."
        )
    for name in DINO_RUNS:
        if name not in checks:
            continue
        c = checks[name]
        curve = ", ".join(
            f"{s}: {loss:.2f} / {entropy:.2f}" for s, loss, entropy in c["eval_curve"]
        )
        lines.append(
            f"- {LABELS[name]}: loss {c['eval_loss']:.3f}, teacher entropy "
            f"{c['teacher_entropy']:.3f} (ln K = {c['ln_prototypes']:.3f} is a "
            "uniform teacher, 0 a one-hot one: collapse drives the entropy to "
            f"either end); held-out loss / teacher entropy by step: {curve}."
        )
    for name in SIMCLR_RUNS:
        if name not in checks:
            continue
        c = checks[name]
        lines.append(
            f"- {LABELS[name]}: positive-pair top-1 {100 * c['positive_top1']:.1f}% "
            f"vs chance {100 * c['chance']:.2f}% (1 / (2N - 1))."
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--runs-dir", default=os.path.join(REPO, "runs", "vision_study")
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    summaries, times = {}, {}
    for method in args.methods:
        done = os.path.exists(os.path.join(args.runs_dir, method, "summary.json"))
        if args.report_only and not done:
            continue
        summaries[method] = run(method, args.runs_dir)
        times[method] = f"{summaries[method]['wall_time_s'] / 60:.0f} min"
    results = {m: s["features"] for m, s in summaries.items()}
    results.update(pixel_baselines())
    order = [m for m in LABELS if m in results]
    results = {m: results[m] for m in order}
    checks = mechanism_checks(args.runs_dir, summaries)
    curves = feature_curves(args.runs_dir, summaries)
    docs = os.path.join(REPO, "docs")
    accuracy_figure(results, os.path.join(docs, "vision_accuracy.png"))
    curve_figure(curves, results, os.path.join(docs, "vision_curve.png"))
    if "mae" in summaries:
        mae_figure(
            os.path.join(args.runs_dir, "mae"), os.path.join(docs, "vision_mae.png")
        )
    with open(os.path.join(docs, "vision.json"), "w") as f:
        record = {"results": results, "checks": checks, "times": times}
        json.dump({**record, "curves": curves}, f, indent=1)
    table = markdown(results, checks, times, curves)
    path = os.path.join(docs, "vision.md")
    text = open(path).read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
