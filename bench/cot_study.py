"""Does a step-by-step scratchpad help a small decoder add? (docs/cot.md)

The same character-level decoder (`configs/gpt_lm.py:tiny`, `data.tokenizer=
char`) learns multi-digit addition, `a+b=` -> answer, from prompt/completion
rows (the loss on the completion only), in three answer formats:

    direct      123+178=301
    reversed    123+178=103             (the sum's digits, least significant first)
    scratchpad  123+178=3+8+0=11,2+7+1=10,1+1+1=3 =301   (per-digit sums, carries)

Training problems have operands of 1 to --digits digits (both operands the
same length, lengths uniform); the test sets are fresh problems with 1 to
--digits digits (in distribution), --digits + 1 and --digits + 2. Each
(format, seed) run is an `fmjax train` command, each test an lm-eval
generate_until task (a YAML written beside the data) run by `fmjax eval
--tasks`, scored by exact match of the answer its regex reads: direct the
leading number, reversed the leading digits (compared reversed), scratchpad
the number after " =".

    python bench/cot_study.py                 # every run, then the report
    python bench/cot_study.py --report-only   # report from finished runs
    python bench/cot_study.py --steps 200 --seeds 0 --out /tmp/cot   # smoke run

Prompting (the second part): one more model, "prompted", learns both
formats from rows that show PROMPT_SHOTS solved problems before the query,
all in one format (direct or scratchpad, half the rows each), so the format
of the examples in its prompt decides how it answers. The same model is then
evaluated through lm-eval with scratchpad exemplars (chain-of-thought
prompting; the answer read by regex after " =") and with direct exemplars
(direct prompting), both drawn by lm-eval's seeded random sampler from a pool
of training problems (`fewshot_config.doc_to_target` picks the format).

Finished runs (summary.json present) are skipped. Writes docs/cot.md (between
the RESULTS markers), docs/cot.json and docs/cot.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
from studies import REPO, run_fmjax, write_results

FORMATS = ("direct", "reversed", "scratchpad")
# What each format's answer regex reads (lm-eval's regex filter, first match).
ANSWER_PATTERNS = {
    "direct": r"^\s*(\d+)",
    "reversed": r"^\s*(\d+)",
    "scratchpad": r" =(\d+)",
}


# The prompted model: solved problems before the query, in training rows and
# in its evaluation prompts; and the exemplar formats it is prompted with.
PROMPT_SHOTS = 2
PROMPTING = ("direct", "scratchpad")


def scratchpad(a: int, b: int) -> str:
    """Column addition, least significant digit first: x+y+carry=total per
    column, then ' =' and the sum."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ",".join(steps) + f" ={a + b}"


def completion(kind: str, a: int, b: int) -> str:
    if kind == "direct":
        return str(a + b)
    if kind == "reversed":
        return str(a + b)[::-1]
    return scratchpad(a, b)


def target(kind: str, a: int, b: int) -> str:
    """What the answer regex must read for an exact match."""
    return str(a + b)[::-1] if kind == "reversed" else str(a + b)


def problems(rng: random.Random, digits: list[int], count: int) -> list[tuple]:
    out = []
    for _ in range(count):
        d = rng.choice(digits)
        low, high = (0 if d == 1 else 10 ** (d - 1)), 10**d - 1
        out.append((rng.randint(low, high), rng.randint(low, high)))
    return out


def write_data(out: str, digits: int, train_count: int, test_count: int) -> dict:
    """Per format a train file (prompt/completion rows, a `split` column) and
    test files with task YAMLs: {format: (train path, {test name: yaml})}."""
    rng = random.Random(0)
    train = problems(rng, list(range(1, digits + 1)), train_count)
    seen = set(train)
    tests = {}
    for name, lengths in (
        (f"1-{digits}", list(range(1, digits + 1))),
        (str(digits + 1), [digits + 1]),
        (str(digits + 2), [digits + 2]),
    ):
        fresh = [p for p in problems(rng, lengths, 3 * test_count) if p not in seen]
        tests[name] = fresh[:test_count]
    files = {}
    for kind in FORMATS:
        folder = os.path.join(out, "data", kind)
        os.makedirs(folder, exist_ok=True)
        train_path = os.path.join(folder, "train.jsonl")
        with open(train_path, "w") as f:
            for i, (a, b) in enumerate(train):
                split = "validation" if i % 50 == 0 else "train"
                row = {"prompt": f"{a}+{b}=", "completion": completion(kind, a, b)}
                f.write(json.dumps({**row, "split": split}) + "\n")
        yamls = {}
        for name, rows in tests.items():
            data = os.path.join(folder, f"test_{name}.jsonl")
            with open(data, "w") as f:
                for a, b in rows:
                    doc = {"prompt": f"{a}+{b}=", "answer": target(kind, a, b)}
                    f.write(json.dumps(doc) + "\n")
            yamls[name] = _task_yaml(folder, kind, name, digits)
        files[kind] = (train_path, yamls)
    files["prompted"] = _write_prompted(out, train, tests, digits)
    return files


def _write_prompted(out: str, train: list, tests: dict, digits: int) -> tuple:
    """The prompted model's train file (PROMPT_SHOTS solved problems, then the
    query, one format per row) and its tasks: {f"{style}:{test}": yaml}."""
    rng = random.Random(1)
    folder = os.path.join(out, "data", "prompted")
    os.makedirs(folder, exist_ok=True)
    train_path = os.path.join(folder, "train.jsonl")
    with open(train_path, "w") as f:
        for i, (a, b) in enumerate(train):
            style = rng.choice(PROMPTING)
            shots = [rng.choice(train) for _ in range(PROMPT_SHOTS)]
            solved = "".join(f"{x}+{y}={completion(style, x, y)}\n" for x, y in shots)
            row = {"prompt": f"{solved}{a}+{b}=", "completion": completion(style, a, b)}
            split = "validation" if i % 50 == 0 else "train"
            f.write(json.dumps({**row, "split": split}) + "\n")
    with open(os.path.join(folder, "pool.jsonl"), "w") as f:
        for a, b in train[:64]:  # the exemplars lm-eval samples
            doc = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
            doc.update({style: completion(style, a, b) for style in PROMPTING})
            f.write(json.dumps(doc) + "\n")
    yamls = {}
    for name, rows in tests.items():
        with open(os.path.join(folder, f"test_{name}.jsonl"), "w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}))
                f.write("\n")
        for style in PROMPTING:
            yamls[f"{style}:{name}"] = _prompted_yaml(folder, style, name, digits)
    return train_path, yamls


def _prompted_yaml(folder: str, style: str, name: str, digits: int) -> str:
    task = f"cot_prompted_{style}_{name.replace('-', '_')}"
    path = os.path.join(folder, f"{task}.yaml")
    longest = len(scratchpad(10 ** (digits + 2) - 1, 10 ** (digits + 2) - 1)) + 8
    with open(path, "w") as f:
        f.write(
            f"task: {task}\ndataset_path: json\n"
            "dataset_kwargs:\n  data_files:\n    train: pool.jsonl\n"
            f"    test: test_{name}.jsonl\n"
            "training_split: train\nfewshot_split: train\ntest_split: test\n"
            "output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            'target_delimiter: ""\nfewshot_delimiter: "\\n"\n'
            "fewshot_config:\n  sampler: default\n"  # seeded random draws
            f'  doc_to_target: "{{{{{style}}}}}"\n'
            f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {longest}\n'
            "  do_sample: false\n"
            "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
            f"        regex_pattern: {json.dumps(ANSWER_PATTERNS[style])}\n"
            "      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return path


def _task_yaml(folder: str, kind: str, name: str, digits: int) -> str:
    task = f"cot_{kind}_{name.replace('-', '_')}"
    path = os.path.join(folder, f"{task}.yaml")
    longest = len(scratchpad(10 ** (digits + 2) - 1, 10 ** (digits + 2) - 1)) + 8
    with open(path, "w") as f:
        f.write(
            f"task: {task}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: test_{name}.jsonl\n"
            "test_split: test\noutput_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            f"generation_kwargs:\n  until: []\n  max_gen_toks: {longest}\n"
            "  do_sample: false\n"
            "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
            f"        regex_pattern: {json.dumps(ANSWER_PATTERNS[kind])}\n"
            "      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return path


def train_and_eval(args, files) -> None:
    for seed in args.seeds:
        for kind in (*FORMATS, "prompted"):
            workdir = os.path.join(args.out, "runs", f"{kind}_seed{seed}")
            train_path, yamls = files[kind]
            log = os.path.join(args.out, f"{kind}_seed{seed}.log")
            prompted = kind == "prompted"
            seq_len = args.prompted_seq_len if prompted else args.seq_len
            if not os.path.exists(os.path.join(workdir, "summary.json")):
                start = time.time()
                run_fmjax(
                    [
                        "train", "--config", "configs/gpt_lm.py:tiny",
                        "--workdir", workdir,
                        f"--config.data.name=jsonl:{train_path}",
                        "--config.data.tokenizer=char",
                        "--config.data.vocab_size=300",
                        "--config.model.vocab_size=300",
                        f"--config.data.seq_len={seq_len}",
                        f"--config.train.steps={args.steps}",
                        f"--config.train.eval_every={args.steps}",
                        f"--config.train.seed={seed}",
                        "--config.train.progress=False",
                    ],
                    log,
                )  # fmt: skip
                print(f"  trained in {time.time() - start:.0f} s", flush=True)
            results = os.path.join(workdir, "cot_eval", "results.json")
            if not os.path.exists(results):
                tasks = ",".join(yamls.values())
                run_fmjax(
                    [
                        "eval", "--workdir", workdir, "--tasks", tasks,
                        "--num-fewshot", str(PROMPT_SHOTS if prompted else 0),
                        "--output", os.path.dirname(results),
                        "--batch-size", "64", "--json",
                    ],
                    log,
                )  # fmt: skip


def _scores(args, run: str, yaml: str, shots: int) -> list[float]:
    """Exact match of the task in `yaml` for run `run` of each seed."""
    task = os.path.basename(yaml)[: -len(".yaml")]
    scores = []
    for seed in args.seeds:
        results = os.path.join(
            args.out, "runs", f"{run}_seed{seed}", "cot_eval", "results.json"
        )
        with open(results) as f:
            result = json.load(f)[str(shots)]["results"][task]
        scores.append(result["exact_match,answer"])
    return scores


def collect(args, files) -> dict:
    table = {}
    for kind in FORMATS:
        for name, yaml in files[kind][1].items():
            table.setdefault(kind, {})[name] = _scores(args, kind, yaml, 0)
    for key, yaml in files["prompted"][1].items():
        style, name = key.split(":")
        scores = _scores(args, "prompted", yaml, PROMPT_SHOTS)
        table.setdefault(f"prompted ({style} exemplars)", {})[name] = scores
    return table


def report(args, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(table.values())))
    kinds = list(table)  # the formats, then the prompted model's two prompts
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [np.mean(table[kind][n]) for n in names]
        spreads = [np.std(table[kind][n]) for n in names]
        x = np.arange(len(names)) + (i - (len(kinds) - 1) / 2) * width
        ax.bar(x, means, width, yerr=spreads, label=kind, capsize=3)
    ax.set_xticks(np.arange(len(names)), [f"{n} digits" for n in names])
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(
        f"addition, trained on 1-{args.digits} digits, {len(args.seeds)} seeds"
    )
    fig.tight_layout()
    plot = os.path.join(args.docs, "cot.png")
    fig.savefig(plot, dpi=120)
    rows = ["| format | " + " | ".join(f"{n} digits" for n in names) + " |"]
    rows.append("|---|" + "---:|" * len(names))
    for kind in kinds:
        cells = [
            f"{np.mean(table[kind][n]):.3f} ± {np.std(table[kind][n]):.3f}"
            for n in names
        ]
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    settings = (
        f"`python bench/cot_study.py --digits {args.digits} --steps {args.steps} "
        f"--seeds {' '.join(map(str, args.seeds))}` ({args.train_count} training "
        f"problems, {args.test_count} per test set; exact match, mean ± standard "
        f"deviation over seeds {', '.join(map(str, args.seeds))}, ddof 0: with two "
        "seeds, half their difference)"
    )
    body = f"{settings}\n\n" + "\n".join(rows) + "\n\n![exact match](cot.png)\n"
    with open(os.path.join(args.docs, "cot.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "table": table}, f)
    write_results(os.path.join(args.docs, "cot.md"), "Chain of thought", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompted-seq-len", type=int, default=192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-count", type=int, default=20000)
    parser.add_argument("--test-count", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "cot_study"))
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    files = write_data(args.out, args.digits, args.train_count, args.test_count)
    if not args.report_only:
        train_and_eval(args, files)
    report(args, collect(args, files))


if __name__ == "__main__":
    main()
