"""Does retrieval help a small decoder answer questions it cannot know?
(docs/rag.md)

Made-up facts (random names, birthplaces, years and trades, so no model can
know them): a passage per person,

    Belor Quintaro was born in Tarvenmere in 1843 and worked as a glassmaker.

A decoder (`configs/gpt_lm.py:tiny`, a tokenizer trained on the file) learns
reading comprehension from prompt/completion rows: 1 to MAX_PASSAGES passages
(the right one among others, in a random place), a blank line, then

    Question: Where was Belor Quintaro born?
    Answer:                                    ->  " Tarvenmere"

about people of the training set. The test asks about other people, whose
passages it never saw: their facts are only in a corpus (all passages, test
and training people) indexed with `fmjax embed` (all-MiniLM-L6-v2). Each
condition is `fmjax eval --tasks` on a generate_until task the script writes,
scored by exact match of the answer:

- closed book: the question alone;
- retrieval, k = 1, 3, 5: `--retrieve INDEX -k K` puts the k passages nearest
  the question (`fmjax search`'s exact top-k) in front of it, best first, in
  the training rows' layout;
- gold: the right passage alone in front (an upper bound for the reader);
- gold + 2 / 4 random: the right passage first, then 2 or 4 passages of
  random training people, the kind of distractors training had: what
  retrieval at k = 3 / 5 would give if its extra passages were random ones
  rather than the nearest;
- closed, training people: the question alone, about people the reader
  trained on (a control: what its weights answer without reading).

Retrieval recall@k is the share of questions whose passage is among the k
found (`fmjax search --json`).

    python bench/rag_study.py                 # every run, then the report
    python bench/rag_study.py --report-only   # report from finished runs
    python bench/rag_study.py --steps 200 --seeds 0 --out /tmp/rag   # smoke run

Writes docs/rag.md (between the RESULTS markers), docs/rag.json and
docs/rag.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
from studies import REPO, run_fmjax, write_results

MAX_PASSAGES = 5
KS = (1, 3, 5)
# The gold passage first, then random training people's passages: what
# retrieval at k = 1 + count gives, with the distractors training had.
DISTRACTORS = (2, 4)
SYLLABLES = (
    "ba lor quin tar va mel dor ith en ko ra sul vin zet mar lo ny pe shi tu "
    "wen ga fi ro del an bri cas"
).split()
PLACE_ENDINGS = ("mere", "ford", "holm", "stad", "ton", "vale")
TRADES = (
    "glassmaker baker cooper weaver tanner mason potter brewer fletcher "
    "chandler saddler thatcher miller smith carpenter tailor dyer roper "
    "wheelwright bookbinder clockmaker locksmith jeweller printer"
).split()
QUESTIONS = {
    "place": "Where was {name} born?",
    "year": "When was {name} born?",
    "trade": "What did {name} work as?",
}
ANSWER_PATTERN = r"^\s*(.*?)\s*$"  # the generated line, trimmed


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def people(rng: random.Random, count: int, taken: set) -> list[dict]:
    """`count` made-up people with distinct names not in `taken`."""
    out = []
    while len(out) < count:
        name = f"{_word(rng, 2)} {_word(rng, 3)}"
        if name in taken:
            continue
        taken.add(name)
        place = _word(rng, 2) + rng.choice(PLACE_ENDINGS)
        out.append(
            {
                "name": name,
                "place": place,
                "year": str(rng.randint(1700, 1999)),
                "trade": rng.choice(TRADES),
            }
        )
    return out


def passage(person: dict) -> str:
    return (
        f"{person['name']} was born in {person['place']} in {person['year']} "
        f"and worked as a {person['trade']}."
    )


def question(person: dict, kind: str) -> str:
    return f"Question: {QUESTIONS[kind].format(name=person['name'])}\nAnswer:"


def write_data(out: str, train_people: int, rows: int, test_people: int) -> dict:
    """Train file, corpus, test documents and the task YAMLs."""
    rng = random.Random(0)
    taken: set = set()
    train, test = people(rng, train_people, taken), people(rng, test_people, taken)
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    train_path = os.path.join(folder, "train.jsonl")
    with open(train_path, "w") as f:
        for i in range(rows):
            person = rng.choice(train)
            kind = rng.choice(list(QUESTIONS))
            shown = rng.randint(1, MAX_PASSAGES)
            others = rng.sample(train, shown)
            texts = [passage(p) for p in others if p is not person][: shown - 1]
            texts.insert(rng.randint(0, len(texts)), passage(person))
            row = {
                "prompt": "\n".join(texts) + "\n\n" + question(person, kind),
                "completion": " " + person[kind],
                "split": "validation" if i % 50 == 0 else "train",
            }
            f.write(json.dumps(row) + "\n")
    corpus = os.path.join(folder, "corpus.jsonl")
    with open(corpus, "w") as f:
        everyone = train + test
        for i in rng.sample(range(len(everyone)), len(everyone)):
            f.write(
                json.dumps({"id": everyone[i]["name"], "text": passage(everyone[i])})
            )
            f.write("\n")
    test_path = os.path.join(folder, "test.jsonl")
    # Distractors drawn as training draws them (random people), from a
    # generator of their own so the files above stay as they were.
    distractor_rng = random.Random(1)
    with open(test_path, "w") as f:
        for person in test:
            kind = rng.choice(list(QUESTIONS))
            doc = {
                "question": question(person, kind),
                "passage": passage(person),
                "answer": person[kind],
                "name": person["name"],
            }
            for count in DISTRACTORS:
                others = distractor_rng.sample(train, count)
                texts = [passage(person)] + [passage(p) for p in others]
                doc[f"gold_and_{count}_random"] = "\n".join(texts)
            f.write(json.dumps(doc) + "\n")
    files = {
        "train": train_path,
        "corpus": corpus,
        "test": test_path,
        "closed": _task_yaml(folder, "rag_closed", "{{question}}"),
        "gold": _task_yaml(folder, "rag_gold", "{{passage}}\\n\\n{{question}}"),
    }
    for count in DISTRACTORS:
        name = f"gold_and_{count}_random"
        files[name] = _task_yaml(
            folder, f"rag_{name}", f"{{{{{name}}}}}\\n\\n{{{{question}}}}"
        )
    # A control: closed-book questions about people the reader trained on.
    # Right answers there come from the weights, not from reading.
    trained_rng = random.Random(2)
    with open(os.path.join(folder, "trained.jsonl"), "w") as f:
        for person in train[:test_people]:
            kind = trained_rng.choice(list(QUESTIONS))
            doc = {"question": question(person, kind), "answer": person[kind]}
            f.write(json.dumps(doc) + "\n")
    files["closed_trained"] = _task_yaml(
        folder, "rag_closed_trained", "{{question}}", "trained.jsonl"
    )
    return files


def _task_yaml(folder: str, task: str, text: str, data: str = "test.jsonl") -> str:
    path = os.path.join(folder, f"{task}.yaml")
    with open(path, "w") as f:
        f.write(
            f"task: {task}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\noutput_type: generate_until\n"
            f'doc_to_text: "{text}"\ndoc_to_target: "{{{{answer}}}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 24\n'
            "  do_sample: false\n"
            "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
            f"        regex_pattern: {json.dumps(ANSWER_PATTERN)}\n"
            "      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return path


def build_index(args, files) -> tuple[str, dict]:
    """The corpus index (MiniLM) and recall@k of the test questions."""
    index = os.path.join(args.out, "index")
    log = os.path.join(args.out, "index.log")
    if not os.path.exists(os.path.join(index, "index.json")):
        run_fmjax(
            ["embed", "--workdir", "all-MiniLM-L6-v2", "--input", files["corpus"],
             "--output", index],
            log,
        )  # fmt: skip
    docs = [json.loads(line) for line in open(files["test"])]
    queries = os.path.join(args.out, "queries.jsonl")
    with open(queries, "w") as f:
        # The query fmjax eval --retrieve uses: the task's doc_to_text.
        f.write("".join(json.dumps(d["question"]) + "\n" for d in docs))
    found = run_fmjax(
        ["search", "--index", index, "--query-file", queries, "-k", str(max(KS)),
         "--json"],
        log,
        capture=True,
    )  # fmt: skip
    results = json.loads(found.strip().splitlines()[-1])["results"]
    hits = [r["hits"] for r in results]
    found_names = [[hit["id"] for hit in hit_list] for hit_list in hits]
    recall = {
        k: float(
            np.mean(
                [
                    d["name"] in names[:k]
                    for d, names in zip(docs, found_names, strict=True)
                ]
            )
        )
        for k in KS
    }
    return index, recall


def train_and_eval(args, files, index) -> dict:
    scores: dict = {}
    for seed in args.seeds:
        workdir = os.path.join(args.out, "runs", f"seed{seed}")
        log = os.path.join(args.out, f"seed{seed}.log")
        if not os.path.exists(os.path.join(workdir, "summary.json")):
            start = time.time()
            run_fmjax(
                [
                    "train", "--config", "configs/gpt_lm.py:tiny",
                    "--workdir", workdir,
                    f"--config.data.name=jsonl:{files['train']}",
                    f"--config.data.vocab_size={args.vocab_size}",
                    f"--config.model.vocab_size={args.vocab_size}",
                    f"--config.data.seq_len={args.seq_len}",
                    f"--config.train.steps={args.steps}",
                    f"--config.train.eval_every={args.steps}",
                    "--config.train.eval_batches=10",
                    f"--config.train.seed={seed}",
                    "--config.train.progress=False",
                    "--config.mesh.num_devices=1",
                ],
                log,
            )  # fmt: skip
            print(f"  trained seed {seed} in {time.time() - start:.0f} s", flush=True)
        conditions = {"closed": ([files["closed"]], [])}
        for k in KS:
            retrieve = ["--retrieve", index, "-k", str(k)]
            conditions[f"retrieval k={k}"] = ([files["closed"]], retrieve)
        conditions["gold"] = ([files["gold"]], [])
        for count in DISTRACTORS:
            name = f"gold_and_{count}_random"
            conditions[f"gold + {count} random"] = ([files[name]], [])
        conditions["closed, training people"] = ([files["closed_trained"]], [])
        for name, (tasks, extra) in conditions.items():
            output = os.path.join(workdir, "rag_eval", name.replace(" ", "_"))
            results = os.path.join(output, "results.json")
            if not os.path.exists(results):
                run_fmjax(
                    ["eval", "--workdir", workdir, "--tasks", ",".join(tasks),
                     "--num-fewshot", "0", "--output", output, "--batch-size", "64",
                     "--json", *extra],
                    log,
                )  # fmt: skip
            with open(results) as f:
                result = json.load(f)["0"]["results"]
            (task,) = result
            scores.setdefault(name, []).append(result[task]["exact_match,answer"])
    return scores


def report(args, scores: dict, recall: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(8, 4))
    means = [np.mean(scores[n]) for n in names]
    ax.bar(names, means, yerr=[np.std(scores[n]) for n in names], capsize=3)
    for k in KS:
        i = names.index(f"retrieval k={k}")
        ax.plot([i - 0.4, i + 0.4], [recall[k]] * 2, color="black", ls="--")
    ax.set_ylabel("exact match (dashed: recall@k)")
    ax.tick_params(axis="x", labelrotation=25)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"questions about unseen people, {len(args.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "rag.png"), dpi=120)
    rows = ["| condition | exact match | per seed | retrieval recall@k |"]
    rows.append("|---|---:|---|---:|")
    for name in names:
        k = int(name.split("=")[1]) if "=" in name else None
        cells = ", ".join(f"{v:.3f}" for v in scores[name])
        rows.append(
            f"| {name} | {np.mean(scores[name]):.3f} ± {np.std(scores[name]):.3f} "
            f"| {cells} | {f'{recall[k]:.3f}' if k else '-'} |"
        )
    settings = (
        f"`python bench/rag_study.py --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))}` ({args.train_people} training people, "
        f"{args.rows} training rows, {args.test_people} test questions, a corpus "
        f"of {args.train_people + args.test_people} passages; exact match, mean ± "
        "standard deviation over seeds, ddof 0: with two seeds, half their "
        "difference)"
    )
    body = f"{settings}\n\n" + "\n".join(rows) + "\n\n![exact match](rag.png)\n"
    with open(os.path.join(args.docs, "rag.json"), "w") as f:
        json.dump({"args": vars(args), "scores": scores, "recall": recall}, f)
    write_results(os.path.join(args.docs, "rag.md"), "Retrieval augmentation", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-people", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--test-people", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "rag_study"))
    parser.add_argument("--docs", default=os.path.join(REPO, "docs"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    files = write_data(args.out, args.train_people, args.rows, args.test_people)
    index, recall = build_index(args, files)
    if args.report_only:
        with open(os.path.join(args.docs, "rag.json")) as f:
            scores = json.load(f)["scores"]
    else:
        scores = train_and_eval(args, files, index)
    report(args, scores, recall)


if __name__ == "__main__":
    main()
