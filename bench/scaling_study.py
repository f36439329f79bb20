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
import json
import math
import os
import time

import numpy as np
from studies import REPO, run_fmjax, write_results

# (d_model, layers); heads of 64 dims, MLP 4 d.
SIZES = ((64, 2), (128, 3), (256, 4), (384, 6), (512, 6))
# Kaplan et al. 2020, L(N) fitted on converged models (their eq. 1.1).
KAPLAN_ALPHA_N = 0.076


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
    rows = []
    steps = args.tokens // (args.batch_size * args.seq_len)
    for width, layers in SIZES[: args.sizes]:
        workdir = os.path.join(args.out, "runs", f"d{width}_l{layers}")
        summary = json.load(open(os.path.join(workdir, "summary.json")))
        n = non_embedding_params(width, layers)
        tokens_per_step = args.batch_size * args.seq_len
        rows.append(
            {
                "width": width,
                "layers": layers,
                "non_embedding_params": n,
                "all_params": summary["params"]["all_params"],
                "learning_rate": learning_rate(n),
                "steps": steps,
                "tokens": steps * tokens_per_step,
                "eval_loss": summary["eval"]["loss"],
                "curve": [
                    {"step": s, "compute": 6 * n * s * tokens_per_step, "loss": v}
                    for s, v in eval_curve(workdir)
                ],
                "wall_time_s": summary.get("wall_time_s"),
            }
        )
    return rows


def report(args, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_S = np.array([r["non_embedding_params"] for r in rows], np.float64)
    loss_S = np.array([r["eval_loss"] for r in rows], np.float64)
    power = fit_power_law(n_S, loss_S)
    floor = fit_with_floor(n_S, loss_S) if len(rows) >= 4 else None
    fig, (ax_n, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    ax_n.loglog(n_S, loss_S, "o", label="eval loss (end of training)")
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
        ax_c.loglog(
            [p["compute"] for p in r["curve"]],
            [p["loss"] for p in r["curve"]],
            marker="o",
            label=f"N = {r['non_embedding_params']:,}",
        )
    ax_c.set_xlabel("compute C = 6 N D (FLOPs)")
    ax_c.set_ylabel("validation loss")
    ax_c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "scaling_laws.png"), dpi=110)
    lines = [
        "| d_model x layers | non-embedding N | all params | learning rate | "
        "eval loss | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} x {r['layers']} | {r['non_embedding_params']:,} | "
            f"{r['all_params']:,} | {r['learning_rate']:.2e} | {r['eval_loss']:.3f} | "
            f"{r['wall_time_s']:.0f} s |"
        )
    fits = [
        f"- L(N) = (N_c / N)^alpha_N: alpha_N = {power['alpha']:.3f}, "
        f"N_c = {power['n_c']:.3g} (Kaplan et al.: alpha_N = {KAPLAN_ALPHA_N})."
    ]
    if floor:
        fits.append(
            f"- L(N) = E + A N^-alpha: E = {floor['e']:.3f}, alpha = "
            f"{floor['alpha']:.3f}."
        )
    settings = (
        f"`python bench/scaling_study.py --tokens {args.tokens}` ({rows[0]['steps']} "
        f"steps of {args.batch_size} rows x {args.seq_len} tokens for every size)"
    )
    body = (
        f"{settings}\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(fits)
        + "\n\n![loss against size and compute](scaling_laws.png)\n"
    )
    with open(os.path.join(args.docs, "scaling_laws.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "power": power, "floor": floor}, f)
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
        "--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
        help="init and data-order seeds, e.g. 0,1",
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
