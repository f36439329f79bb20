"""When does in-context learning emerge from the data? (docs/icl.md)

A token version of Chan et al. 2022 (fmjax.data.icl): small decoders
(`configs/gpt_lm.py:tiny` at three widths) learn to label items from
sequences of (item, label) pairs, the loss on the query's label only
(prompt/completion rows, `data.name=jsonl:FILE`, `data.tokenizer` the word
model in which every item and label is one token). Every evaluation is
`fmjax eval --tasks` on the shipped lm-eval tasks:

- tasks/icl_heldout.yaml: classes never trained on, labels fresh in every
  sequence, k = 0, 1, 2, 4, 8 of the document's own examples in context;
  accuracy above 1/32 is in-context learning;
- tasks/icl_inweights.yaml: the 200 most frequent trained classes, with no
  context (k = 0) and with 8 examples of other classes (k = 8, Chan et al.'s
  measure: a training-like context that never shows the query's class);
  accuracy above 1/32 is in-weights learning.

Conditions vary one thing from the base (bursty p = 0.9, Zipf exponent 1,
width 64): p in {0, 0.5, 0.9, 1}, Zipf in {0, 1, 2}, width in {32, 64, 128}
(2 layers: 25k to 390k non-embedding parameters). The base condition is
also evaluated along training (constant learning rate after warmup, so a run
stopped and resumed at each point is the same run), which dates the step at
which in-context learning appears; `--curve` may go past `--steps` (the base
runs go on training). `--onset` evaluates a second pair of base runs, the
same config and seeds in their own directory (out/onset), at early steps, to
date the first appearance more finely than the curve's first point. Every
stop must come after the warmup (30 steps): a run of fewer steps warms up
over all of them, and resumed it is another run (stopped after the warmup,
a resumed run equals an uninterrupted one to the last bit).

    python bench/icl_study.py                 # every run, then the report
    python bench/icl_study.py --report-only   # report from finished runs
    python bench/icl_study.py --steps 300 --seeds 0 --out /tmp/icl  # smoke run
    python bench/icl_study.py --steps 1200 --curve 150 300 --onset 30 50 100

Finished runs and evaluations are skipped. Writes docs/icl.md (between the
RESULTS markers), docs/icl.json and docs/icl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from studies import REPO, run_fmjax, write_results

sys.path.insert(0, REPO)

from fmjax.config import load_config  # noqa: E402
from fmjax.data import icl  # noqa: E402

SHOTS = (0, 1, 2, 4, 8)
TASKS = {
    "heldout": os.path.join(REPO, "tasks", "icl_heldout.yaml"),
    "inweights": os.path.join(REPO, "tasks", "icl_inweights.yaml"),
}
BASE = {"bursty": 0.9, "zipf": 1.0, "width": 64}
SWEEPS = {
    "bursty": (0.0, 0.5, 0.9, 1.0),
    "zipf": (0.0, 1.0, 2.0),
    "width": (32, 64, 128),
}


def conditions() -> list[dict]:
    """The base and each one-factor change from it, each once."""
    out = [dict(BASE)]
    for key, values in SWEEPS.items():
        for value in values:
            condition = {**BASE, key: value}
            if condition not in out:
                out.append(condition)
    return out


def name_of(condition: dict) -> str:
    return "p{bursty:g}_zipf{zipf:g}_d{width}".format(**condition)


def spec_of(condition: dict) -> icl.IclSpec:
    return icl.IclSpec(bursty=condition["bursty"], zipf=condition["zipf"])


def non_embedding_params(width: int, layers: int = 2) -> int:
    """Attention (4 d^2 + biases) and MLP (2 * 4 d^2 + biases) per layer, with
    its two layer norms; the tiny config's head_dim * heads = width."""
    per_layer = 4 * width * width + 4 * width + 8 * width * width + 5 * width
    return layers * (per_layer + 4 * width) + 2 * width


def write_data(args) -> dict:
    """A training file per data condition, and the shared tokenizer."""
    folder = os.path.join(args.out, "data")
    os.makedirs(folder, exist_ok=True)
    tokenizer = os.path.join(folder, "icl_word.model")
    if not os.path.exists(tokenizer):
        icl.write_tokenizer(icl.IclSpec(), tokenizer)
    files = {}
    for condition in conditions():
        spec = spec_of(condition)
        path = os.path.join(folder, f"p{spec.bursty:g}_zipf{spec.zipf:g}.jsonl")
        if path not in files.values() and not os.path.exists(path):
            icl.write_training_file(spec, path, args.sequences, seed=1, n_val=2000)
        files[name_of(condition)] = path
    return {"tokenizer": tokenizer, "train": files}


def train(args, data, condition, seed: int, steps: int) -> str:
    """Trains (or resumes) a run to `steps`; its workdir."""
    name = name_of(condition)
    workdir = os.path.join(args.out, "runs", f"{name}_seed{seed}")
    done = os.path.join(workdir, "summary.json")
    if os.path.exists(done) and json.load(open(done)).get("steps") >= steps:
        return workdir  # there (or past it: its evaluation at `steps` is kept)
    width = condition["width"]
    start = time.time()
    run_fmjax(
        [
            "train", "--config", "configs/gpt_lm.py:tiny", "--workdir", workdir,
            f"--config.data.name=jsonl:{data['train'][name]}",
            f"--config.data.tokenizer={data['tokenizer']}",
            "--config.model.vocab_size=384",
            f"--config.model.d_model={width}",
            f"--config.model.head_dim={width // 2}",
            f"--config.model.mlp_dim={4 * width}",
            f"--config.data.seq_len={args.seq_len}",
            f"--config.data.batch_size={args.batch_size}",
            "--config.optimizer.schedule=constant",
            f"--config.optimizer.learning_rate={args.learning_rate}",
            f"--config.train.steps={steps}",
            f"--config.train.eval_every={steps}",
            "--config.train.eval_batches=10",
            f"--config.checkpoint.every={steps}",
            f"--config.train.seed={seed}",
            "--config.train.progress=False",
            "--config.mesh.num_devices=1",
        ],
        os.path.join(args.out, f"{name}_seed{seed}.log"),
    )  # fmt: skip
    print(f"  {name} seed {seed}: step {steps} in {time.time() - start:.0f} s")
    return workdir


INWEIGHTS_SHOTS = (0, 8)


def evaluate(args, workdir: str, steps: int) -> dict:
    """{task: {k: accuracy}} of the run at `steps` (its latest export)."""
    table = {}
    for task, shots in (("heldout", SHOTS), ("inweights", INWEIGHTS_SHOTS)):
        output = os.path.join(workdir, "icl_eval", f"step{steps}", task)
        results = os.path.join(output, "results.json")
        if not os.path.exists(results):
            at = json.load(open(os.path.join(workdir, "summary.json")))["steps"]
            if at != steps:
                raise RuntimeError(
                    f"{workdir} is at step {at}, not {steps}: its evaluation at "
                    f"{steps} was not kept; train a new run (another --out)"
                )
            run_fmjax(
                [
                    "eval", "--workdir", workdir, "--tasks", TASKS[task],
                    "--num-fewshot", ",".join(map(str, shots)),
                    "--output", output, "--batch-size", "64", "--json",
                ],
                os.path.join(workdir, "eval.log"),
            )  # fmt: skip
        with open(results) as f:
            by_shots = json.load(f)
        table[task] = {
            k: by_shots[str(k)]["results"][f"icl_{task}"]["acc,none"] for k in shots
        }
    return table


def study(args) -> dict:
    data = write_data(args)
    results = {"final": {}, "curve": {}, "onset": {}}
    for condition in conditions():
        name = name_of(condition)
        for seed in args.seeds:
            # The base run is evaluated along training, resumed each time; its
            # curve may go on past --steps, where the other conditions stop.
            points = [args.steps]
            if condition == BASE:
                points = sorted({*args.curve, args.steps})
            for steps in points:
                workdir = train(args, data, condition, seed, steps)
                table = evaluate(args, workdir, steps)
                if condition == BASE:
                    results["curve"].setdefault(str(seed), {})[steps] = table
                if steps == args.steps:
                    results["final"].setdefault(name, {})[str(seed)] = table
    onset_args = argparse.Namespace(
        **{**vars(args), "out": os.path.join(args.out, "onset")}
    )
    os.makedirs(onset_args.out, exist_ok=True)
    for seed in args.seeds:
        for steps in sorted(args.onset):
            workdir = train(onset_args, data, BASE, seed, steps)
            table = evaluate(onset_args, workdir, steps)
            results["onset"].setdefault(str(seed), {})[steps] = table
    return results


def _mean_std(values) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def _spread(by_seed: np.ndarray) -> np.ndarray:
    """Error bars: the standard deviation over seeds (axis 0), as the tables."""
    return by_seed.std(axis=0)


def _along_training(results: dict, seeds: list[str]) -> list:
    """[(step, runs, {seed: table})] by step: the base condition's curve
    evaluations and the onset runs' (both where both have a step)."""
    along = []
    for source in ("onset", "curve"):
        for steps in results.get(source, {}).get(seeds[0], {}):
            along.append((steps, source, {s: results[source][s][steps] for s in seeds}))
    return sorted(along, key=lambda point: point[0])


def report(args, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    chance = 1 / icl.IclSpec().num_labels
    seeds = [str(s) for s in args.seeds]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, key in zip(axes[:3], SWEEPS, strict=True):
        for value in SWEEPS[key]:
            name = name_of({**BASE, key: value})
            runs = results["final"][name]
            by_seed = np.array([[runs[s]["heldout"][k] for k in SHOTS] for s in seeds])
            ax.errorbar(
                SHOTS, by_seed.mean(0), yerr=_spread(by_seed), marker="o",
                capsize=3, label=f"{key} = {value:g}",
            )  # fmt: skip
        ax.axhline(chance, color="gray", ls=":", label="chance (1/32)")
        ax.axhline(0.5, color="gray", ls="--", label="a shown label (k >= 2)")
        ax.set_xlabel("examples in context (k)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"varying {key}")
        ax.legend(fontsize=8)
    ax = axes[3]
    along = _along_training(results, seeds)
    steps = [point[0] for point in along]
    for label, task, k, marker in (
        ("held-out, k = 1", "heldout", 1, "o"),
        ("held-out, k = 8", "heldout", 8, "s"),
        ("in-weights, k = 8", "inweights", 8, "x"),
    ):
        by_seed = np.array([[at[s][task][k] for _, _, at in along] for s in seeds])
        ax.errorbar(
            steps, by_seed.mean(0), yerr=_spread(by_seed), marker=marker,
            capsize=3, label=label,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks([t for t in (10, 30, 100, 300, 1000, 3000, 10000) if t <= max(steps)])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(chance, color="gray", ls=":")
    ax.axhline(0.5, color="gray", ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("base condition over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "icl.png"), dpi=110)

    header = "| condition | non-emb. params | " + " | ".join(
        f"held-out k={k}" for k in SHOTS
    )
    header += " | in-weights k=0 | in-weights k=8"
    rows = [header + " |", "|---|---:|" + "---:|" * 7]
    for condition in conditions():
        name = name_of(condition)
        runs = results["final"][name]
        cells = [_mean_std([runs[s]["heldout"][k] for s in seeds]) for k in SHOTS]
        cells += [
            _mean_std([runs[s]["inweights"][k] for s in seeds]) for k in INWEIGHTS_SHOTS
        ]
        params = non_embedding_params(condition["width"])
        label = (
            f"p={condition['bursty']:g}, zipf={condition['zipf']:g}, "
            f"d={condition['width']}"
        )
        rows.append(f"| {label} | {params:,} | " + " | ".join(cells) + " |")
    curve_rows = [
        "| step | runs | held-out, k=1 | held-out, k=2 | held-out, k=8 | "
        "in-weights, k=8 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for steps, source, at in along:
        cells = [
            _mean_std([at[s][task][k] for s in seeds])
            for task, k in (("heldout", 1), ("heldout", 2), ("heldout", 8),
                            ("inweights", 8))
        ]  # fmt: skip
        curve_rows.append(f"| {steps} | {source} | " + " | ".join(cells) + " |")
    settings = (
        f"`python bench/icl_study.py --steps {args.steps} --curve "
        f"{' '.join(map(str, args.curve))}"
        + (f" --onset {' '.join(map(str, args.onset))}" if args.onset else "")
        + f" --seeds {' '.join(seeds)}` "
        f"({args.sequences:,} training sequences per data "
        f"condition, batch {args.batch_size} rows of {args.seq_len} tokens, "
        f"learning rate {args.learning_rate:g}; accuracy over 400 held-out and 200 "
        f"in-weights documents, mean ± standard deviation over seeds "
        f"{', '.join(seeds)} (ddof 0: with two seeds, half their difference; "
        "the error bars in the figure are the same); "
        f"chance {chance:.3f}; at k >= 2 a label shown at random scores 0.5)"
    )
    body = (
        f"{settings}\n\n" + "\n".join(rows) + "\n\nThe base condition along "
        "training (curve: the runs above, evaluated as they went; onset: a "
        "second pair of runs of the same config and seeds, evaluated early):\n\n"
        + "\n".join(curve_rows)
        + "\n\n![in-context learning](icl.png)\n"
    )
    with open(os.path.join(args.docs, "icl.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    write_results(os.path.join(args.docs, "icl.md"), "In-context learning", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--curve", type=int, nargs="+", default=None)
    parser.add_argument("--onset", type=int, nargs="+", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sequences", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "icl_study"))
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.curve is None:
        args.curve = [args.steps * f // 8 for f in (1, 2, 3, 4, 6)]
    warmup = load_config("configs/gpt_lm.py:tiny").optimizer.warmup_steps
    if min([*args.curve, *args.onset, args.steps]) < warmup:
        # A run's schedule warms up over min(warmup, its steps): stopped
        # earlier, it would not be the same run resumed.
        parser.error(
            f"--curve/--onset/--steps below the config's {warmup} warmup steps: "
            "a run stopped there warms up faster and resumes as another run"
        )
    if args.report_only:
        with open(os.path.join(args.docs, "icl.json")) as f:
            results = json.load(f)["results"]
        report(args, _int_keys(results))
    else:
        report(args, study(args))


def _int_keys(results: dict) -> dict:
    """JSON keys back to ints (shots, and the curve's steps)."""

    def fix(table):
        return {task: {int(k): v for k, v in by.items()} for task, by in table.items()}

    return {
        "final": {
            n: {s: fix(t) for s, t in runs.items()}
            for n, runs in results["final"].items()
        },
        **{
            part: {
                s: {int(steps): fix(t) for steps, t in c.items()}
                for s, c in results.get(part, {}).items()
            }
            for part in ("curve", "onset")
        },
    }


if __name__ == "__main__":
    main()
