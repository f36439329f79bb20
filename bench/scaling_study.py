"""How does a decoder's loss fall with its size? (docs/scaling_laws.md)

Next-token decoders of five sizes (`configs/gpt_lm.py:tiny` with the widths
and depths of SIZES: about 0.1M to 19M non-embedding parameters) train on
the same text (BBC News, the 8,000-piece SentencePiece tokenizer) for the
same number of tokens, each an `fmjax train` run evaluated on the whole
validation split along the way. The learning rate follows the size as Kaplan
et al. 2020 (eq. D.1) set it, lr = 0.003239 - 0.0001395 ln N, so nothing is
tuned here; cosine decay to 0.1 of it after the tiny config's 30 warmup steps.

The fits: L(N) = (N_c / N)^alpha_N (a line in log-log space) and, with an
irreducible term, L(N) = E + A N^-alpha; compute C = 6 N D (non-embedding
parameters N, tokens D) as Kaplan et al. count it.

    python bench/scaling_study.py                     # every run, the report
    python bench/scaling_study.py --report-only
    python bench/scaling_study.py --tokens 200000 --sizes 2 --out /tmp/s  # smoke

Finished runs are skipped. Writes docs/scaling_laws.md (between the RESULTS
markers), docs/scaling_laws.json and docs/scaling_laws.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time

import numpy as np
from studies import REPO, run_fmjax, write_results

# (d_model, layers); heads of 64 dims, MLP 4 d.
SIZES = ((64, 2), (128, 3), (256, 4), (384, 6), (512, 6))
# Kaplan et al. 2020, L(N) fitted on converged models (their eq. 1.1), and
# L(C_min) on the compute-efficient frontier (their eq. 1.3).
KAPLAN_ALPHA_N = 0.076
KAPLAN_ALPHA_C_MIN = 0.050


def non_embedding_params(width: int, layers: int) -> int:
    """Kaplan et al.'s N: the attention and MLP matrices, 12 L d^2 (biases and
    norms are under 1% here and left out, as they leave them out)."""
    return 12 * layers * width * width


def learning_rate(n: int) -> float:
    """Kaplan et al. 2020, eq. D.1."""
    return 0.003239 - 0.0001395 * math.log(n)


def run_dir(args, width: int, layers: int, seed: int) -> str:
    """Seed 0's run is d{width}_l{layers} (as before seeds were added)."""
    name = f"d{width}_l{layers}" + (f"_s{seed}" if seed else "")
    return os.path.join(args.out, "runs", name)


def train(args, width: int, layers: int, seed: int) -> str:
    workdir = run_dir(args, width, layers, seed)
    if os.path.exists(os.path.join(workdir, "summary.json")):
        return workdir
    os.makedirs(os.path.dirname(workdir), exist_ok=True)  # the log goes beside it
    steps = args.tokens // (args.batch_size * args.seq_len)
    n = non_embedding_params(width, layers)
    start = time.time()
    run_fmjax(
        [
            "train", "--config", "configs/gpt_lm.py:tiny", "--workdir", workdir,
            f"--config.model.d_model={width}",
            f"--config.model.num_layers={layers}",
            f"--config.model.num_heads={max(1, width // 64)}",
            f"--config.model.head_dim={min(64, width)}",
            f"--config.model.mlp_dim={4 * width}",
            f"--config.data.seq_len={args.seq_len}",
            f"--config.data.batch_size={args.batch_size}",
            f"--config.optimizer.learning_rate={learning_rate(n):.6f}",
            f"--config.train.steps={steps}",
            f"--config.train.seed={seed}",
            f"--config.data.shuffle_seed={seed}",
            f"--config.train.eval_every={max(1, steps // 4)}",
            "--config.train.eval_batches=0",
            f"--config.checkpoint.every={steps}",
            "--config.train.progress=False",
            "--config.mesh.num_devices=1",
        ],
        workdir + ".log",
    )  # fmt: skip
    print(
        f"  d={width} L={layers} seed {seed}: {time.time() - start:.0f} s", flush=True
    )
    return workdir


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    curve = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "eval" and record["step"] > 0:
                curve.append((record["step"], record["loss"]))
    return curve


def fit_power_law(n_S: np.ndarray, loss_S: np.ndarray) -> dict:
    """log L = alpha (log N_c - log N): a least-squares line in log-log."""
    slope, intercept = np.polyfit(np.log(n_S), np.log(loss_S), 1)
    alpha = -slope
    return {"alpha": float(alpha), "n_c": float(math.exp(intercept / alpha))}


def fit_with_floor(n_S: np.ndarray, loss_S: np.ndarray) -> dict | None:
    """L = E + A N^-alpha (scipy's least squares), or None if it fails."""
    from scipy.optimize import curve_fit

    def model(n, e, a, alpha):
        return e + a * n**-alpha

    try:
        (e, a, alpha), _ = curve_fit(
            model, n_S, loss_S, p0=(loss_S.min() * 0.5, 10.0, 0.2), maxfev=20000
        )
    except RuntimeError:
        return None
    return {"e": float(e), "a": float(a), "alpha": float(alpha)}


def collect(args) -> list[dict]:
    """One row per size: each seed's run, and the seeds' mean loss."""
    rows = []
    steps = args.tokens // (args.batch_size * args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    for width, layers in SIZES[: args.sizes]:
        n = non_embedding_params(width, layers)
        runs = []
        for seed in args.seeds:
            workdir = run_dir(args, width, layers, seed)
            summary = json.load(open(os.path.join(workdir, "summary.json")))
            runs.append({
                "seed": seed,
                "eval_loss": summary["eval"]["loss"],
                "curve": [
                    {"step": s, "compute": 6 * n * s * tokens_per_step, "loss": v}
                    for s, v in eval_curve(workdir)
                ],
                "wall_time_s": summary.get("wall_time_s"),
                "all_params": summary["params"]["all_params"],
            })  # fmt: skip
        losses = [r["eval_loss"] for r in runs]
        rows.append({
            "width": width,
            "layers": layers,
            "non_embedding_params": n,
            "all_params": runs[0]["all_params"],
            "learning_rate": learning_rate(n),
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "eval_loss": float(np.mean(losses)),
            "runs": runs,
        })  # fmt: skip
    return rows


def mean_curve(row: dict) -> list[tuple[float, float]]:
    """(compute, loss) at each evaluation, the loss averaged over seeds."""
    points = collections.defaultdict(list)
    for run in row["runs"]:
        for p in run["curve"]:
            points[p["compute"]].append(p["loss"])
    return [(c, float(np.mean(v))) for c, v in sorted(points.items())]


def compute_frontier(rows: list[dict]) -> list[tuple[float, float]]:
    """The points of all (seed-mean) learning curves that no other point beats
    at equal or less compute: the lowest loss reached by each compute."""
    points = sorted(p for row in rows for p in mean_curve(row))
    frontier, best = [], math.inf
    for compute, loss in points:
        if loss < best:
            frontier.append((compute, loss))
            best = loss
    return frontier


def fit_compute(frontier: list[tuple[float, float]]) -> dict:
    """L(C) = (C_c / C)^alpha_C through the frontier, in log-log."""
    c_F, loss_F = (np.array(v, np.float64) for v in zip(*frontier, strict=True))
    fit = fit_power_law(c_F, loss_F)
    return {"alpha": fit["alpha"], "c_c": fit["n_c"], "points": len(frontier)}


def report(args, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_S = np.array([r["non_embedding_params"] for r in rows], np.float64)
    loss_S = np.array([r["eval_loss"] for r in rows], np.float64)
    power = fit_power_law(n_S, loss_S)
    per_seed = [
        fit_power_law(n_S, np.array([r["runs"][i]["eval_loss"] for r in rows]))
        for i in range(len(args.seeds))
    ]
    floor = fit_with_floor(n_S, loss_S) if len(rows) >= 4 else None
    frontier = compute_frontier(rows)
    compute = fit_compute(frontier) if len(frontier) >= 2 else None

    fig, (ax_n, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    for i in range(len(args.seeds)):
        ax_n.loglog(
            n_S, [r["runs"][i]["eval_loss"] for r in rows], "x", color="gray",
            label="each seed" if i == 0 else None,
        )  # fmt: skip
    ax_n.loglog(n_S, loss_S, "o", label="eval loss, mean over seeds")
    grid = np.geomspace(n_S.min() / 1.5, n_S.max() * 1.5, 50)
    ax_n.loglog(
        grid,
        (power["n_c"] / grid) ** power["alpha"],
        label=f"(N_c / N)^{power['alpha']:.3f}",
    )
    if floor:
        ax_n.loglog(
            grid,
            floor["e"] + floor["a"] * grid ** -floor["alpha"],
            ls="--",
            label=f"{floor['e']:.2f} + A N^-{floor['alpha']:.2f}",
        )
    ax_n.set_xlabel("non-embedding parameters N")
    ax_n.set_ylabel("validation loss (nats/token)")
    ax_n.legend(fontsize=8)
    for r in rows:
        curve = mean_curve(r)
        ax_c.loglog(
            [c for c, _ in curve], [v for _, v in curve], marker="o", ms=3,
            label=f"N = {r['non_embedding_params']:,}",
        )  # fmt: skip
    if compute:
        c_F = np.array([c for c, _ in frontier])
        ax_c.loglog(c_F, [v for _, v in frontier], "ks", mfc="none", label="frontier")
        c_grid = np.geomspace(c_F.min() / 1.5, c_F.max() * 1.5, 50)
        ax_c.loglog(
            c_grid, (compute["c_c"] / c_grid) ** compute["alpha"], "k:",
            label=f"(C_c / C)^{compute['alpha']:.3f}",
        )  # fmt: skip
    ax_c.set_xlabel("compute C = 6 N D (FLOPs)")
    ax_c.set_ylabel("validation loss, mean over seeds")
    ax_c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "scaling_laws.png"), dpi=110)
    seeds = " ".join(str(s) for s in args.seeds)
    lines = [
        "| d_model x layers | non-embedding N | all params | learning rate | "
        f"eval loss, seeds {seeds.replace(' ', ', ')} | mean | train time per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        each = " / ".join(f"{run['eval_loss']:.3f}" for run in r["runs"])
        times = [run["wall_time_s"] for run in r["runs"]]
        lines.append(
            f"| {r['width']} x {r['layers']} | {r['non_embedding_params']:,} | "
            f"{r['all_params']:,} | {r['learning_rate']:.2e} | {each} | "
            f"{r['eval_loss']:.3f} | {min(times):.0f}-{max(times):.0f} s |"
        )
    alphas = ", ".join(f"{f['alpha']:.3f}" for f in per_seed)
    fits = [
        f"- L(N) = (N_c / N)^alpha_N on the seeds' mean: alpha_N = "
        f"{power['alpha']:.3f}, N_c = {power['n_c']:.3g}; fitted to each seed "
        f"alone: {alphas} (Kaplan et al.: alpha_N = {KAPLAN_ALPHA_N})."
    ]
    if floor:
        fits.append(
            f"- L(N) = E + A N^-alpha on the mean: E = {floor['e']:.3f}, alpha = "
            f"{floor['alpha']:.3f}."
        )
    if compute:
        fits.append(
            f"- L(C) = (C_c / C)^alpha_C through the compute frontier (the "
            f"{compute['points']} points of the seed-mean learning curves that no "
            f"point beats at equal or less compute): alpha_C = "
            f"{compute['alpha']:.3f}, C_c = {compute['c_c']:.3g} FLOPs (Kaplan et "
            f"al.: alpha_C^min = {KAPLAN_ALPHA_C_MIN})."
        )
    settings = (
        f"`python bench/scaling_study.py --tokens {args.tokens} --seeds {seeds}` "
        f"({rows[0]['steps']} steps of {args.batch_size} rows x {args.seq_len} "
        "tokens for every size and seed)"
    )
    body = (
        f"{settings}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(fits)
        + "\n\n![loss against size and compute](scaling_laws.png)\n"
    )
    result = {
        "args": vars(args), "rows": rows, "power": power,
        "power_per_seed": per_seed, "floor": floor,
        "frontier": frontier, "compute_fit": compute,
    }  # fmt: skip
    with open(os.path.join(args.docs, "scaling_laws.json"), "w") as f:
        json.dump(result, f)
    write_results(os.path.join(args.docs, "scaling_laws.md"), "Scaling laws", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sizes", type=int, default=len(SIZES), help="the first n")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "scaling_study"))
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1],
        help="init and data-order seeds (as the other studies take them)",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for width, layers in SIZES[: args.sizes]:
                train(args, width, layers, seed)
    report(args, collect(args))


if __name__ == "__main__":
    main()
