"""fmjax vs HF transformers training throughput here -> docs/benchmarks.md.

Runs `fmjax bench train --config C --against hf --json` for the `small` BERT and
GPT configs (each in its own process), and rewrites the table between the
markers in docs/benchmarks.md with the measured numbers. Needs the [hf] extra.

    python bench/train_vs_hf.py
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("configs/gpt_lm.py:small", "configs/bert_mlm.py:small")
BEGIN, END = "<!-- train_vs_hf:begin -->", "<!-- train_vs_hf:end -->"


def run(config: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fmjax.cli",
        "bench",
        "train",
        "--config",
        config,
        "--against",
        "hf",
        "--json",
    ]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    r0 = results[0]
    peaks = ", ".join(
        f"{k} {v / 1e9:.0f}" for k, v in r0["peak_flops_by_library"].items()
    )
    lines = [
        f"Measured on {r0['cpu']} ({r0['cpu_cores']} cores), {r0['threads']} "
        f"threads, {r0['dtype']}, batch "
        f"{r0['batch_size']} x {r0['seq_len']} tokens; each side's median of "
        f"{r0['rounds']} alternating rounds; peak = best f32 2048^3 matmul "
        f"({r0['peak_flops'] / 1e9:.0f} GFLOP/s, from {peaks}).",
        "",
        "| config | fmjax tokens/s | HF tokens/s | fmjax / HF | fmjax MFU | HF MFU "
        "| fmjax ms/step, all rounds | HF ms/step, all rounds |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        rounds = {
            side: " ".join(f"{s * 1e3:.0f}" for s in r[side]["step_s_rounds"])
            for side in ("fmjax", "hf")
        }
        lines.append(
            f"| `{r['config']}` | {r['fmjax']['tokens_per_s']:.0f} | "
            f"{r['hf']['tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x | "
            f"{r['fmjax']['mfu']:.1%} | {r['hf']['mfu']:.1%} | {rounds['fmjax']} | "
            f"{rounds['hf']} |"
        )
    versions = ", ".join(f"{k} {v}" for k, v in r0["versions"].items())
    lines += ["", f"Versions: {versions}."]
    return "\n".join(lines)


def main():
    results = [run(c) for c in CONFIGS]
    path = os.path.join(REPO, "docs", "benchmarks.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    text = text[:start] + "\n" + table(results) + "\n" + text[end:]
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(REPO, "docs", "train_vs_hf.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
