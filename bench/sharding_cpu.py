"""Sharded training on 8 simulated CPU devices -> docs/benchmarks.md + a plot.

1. `fmjax bench memory`: per-device params + optimizer bytes of the compiled
   train step for fsdp = 1, 2, 4, 8 (target: <= 1.15 / N of fsdp=1).
2. `fmjax bench train` throughput on 8 simulated devices (data=8, fsdp=8,
   2x2x2) relative to 1 device. The 8 "devices" share this machine's cores, so
   this measures the overhead of sharding, not a speed-up.

    FMJAX_HOST_DEVICES=8 python bench/sharding_cpu.py
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/gpt_lm.py:small"
BEGIN, END = "<!-- sharding_cpu:begin -->", "<!-- sharding_cpu:end -->"
MESHES = {
    "1 device": ["--config.mesh.num_devices=1", "--config.mesh.data=1"],
    "data=8": ["--config.mesh.data=8"],
    "fsdp=8": ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
    "2x2x2": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
}


def fmjax(*args) -> dict:
    env = dict(os.environ, FMJAX_HOST_DEVICES="8")
    cmd = [sys.executable, "-m", "fmjax.cli", "bench", *args, "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def plot(memory: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = memory["rows"]
    fsdp = [r["fsdp"] for r in rows]
    mib = [r["state_bytes_compiled"] / 2**20 for r in rows]
    ideal = [mib[0] / n for n in fsdp]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(fsdp, mib, "o-", label="compiled step (measured)")
    ax.plot(fsdp, ideal, "--", label="ideal 1/N")
    ax.plot(fsdp, [1.15 * m for m in ideal], ":", label="target 1.15/N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("fsdp devices")
    ax.set_ylabel("params + optimizer MiB / device")
    ax.set_title(memory["config"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    memory = fmjax("memory", "--config", CONFIG)
    throughput = {
        name: fmjax("train", "--config", CONFIG, "--steps", "5", *args)
        for name, args in MESHES.items()
    }
    base = throughput["1 device"]["fmjax"]["tokens_per_s"]
    lines = [
        f"`{CONFIG}` on 8 simulated CPU devices (2 physical cores).",
        "",
        "| fsdp | params + optimizer MiB / device | / fsdp=1 | target | met |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in memory["rows"]:
        lines.append(
            f"| {r['fsdp']} | {r['state_bytes_compiled'] / 2**20:.1f} | "
            f"{r['ratio_to_fsdp1']:.3f} | <= {r['target_ratio']:.3f} | "
            f"{'yes' if r['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        "![fsdp memory](fsdp_memory.png)",
        "",
        "| mesh | tokens/s | / 1 device |",
        "|---|---:|---:|",
    ]
    for name, r in throughput.items():
        tps = r["fmjax"]["tokens_per_s"]
        lines.append(f"| {name} | {tps:.0f} | {tps / base:.2f} |")
    table = "\n".join(lines)
    docs = os.path.join(REPO, "docs")
    plot(memory, os.path.join(docs, "fsdp_memory.png"))
    path = os.path.join(docs, "benchmarks.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table + "\n" + text[end:])
    with open(os.path.join(docs, "sharding_cpu.json"), "w") as f:
        json.dump({"memory": memory, "throughput": throughput}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
