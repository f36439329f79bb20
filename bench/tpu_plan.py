"""Plan TPU jobs from this machine -> docs/scaling.md.

Runs `fmjax compile` (AOT compilation of the real sharded train step for a TPU
topology description, no TPU needed) for the base presets and the 1B and 8B
decoders on v5e-16, v5p-64 and v5p-256, and writes the table. Needs the [tpu]
extra (libtpu).

    python bench/tpu_plan.py
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "configs/bert_mlm.py:base": [],
    "configs/gpt_lm.py:base": [],
    "configs/gpt_lm.py:1b": [],
    "configs/gpt_lm.py:8b": [],
}
TOPOLOGIES = {"v5e-16": "v5e:4x4", "v5p-64": "v5p:2x4x4", "v5p-256": "v5p:4x4x8"}


def compile_one(config: str, topology: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fmjax.cli", "compile", "--config", config]
    cmd += ["--topology", topology, "--json", *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"
    return {"config": config, "topology": topology, "fits": False, "error": error}


def row(name: str, r: dict) -> str:
    if "error" in r:
        reason = r["error"].split("): ")[-1].split(". Shard more")[0]
        return f"| `{r['config']}` | {name} | - | - | does not fit: {reason} | - | - |"
    gib = r["hbm_total_bytes"] / 2**30
    cap = r["hbm_capacity_bytes"] / 2**30
    mesh = "x".join(str(v) for v in r["mesh"].values())
    units = r[r.get("unit", "tokens") + "_per_step"]
    return (
        f"| `{r['config']}` | {name} | {mesh} | {units:,} | "
        f"{gib:.1f} / {cap:.0f} GiB (args {r['hbm_argument_bytes'] / 2**30:.1f}, "
        f"temp {r['hbm_temp_bytes'] / 2**30:.1f}) | "
        f"{r['roofline_step_s'] * 1e3:.0f} ms | {r['roofline_mfu']:.0%} |"
    )


def main():
    results = []
    for config, extra in CONFIGS.items():
        for name, topology in TOPOLOGIES.items():
            print(f"compiling {config} for {name} ...", flush=True)
            results.append((name, compile_one(config, topology, extra)))
    lines = [
        "# Planning TPU jobs",
        "",
        "`fmjax compile --config C --topology T` compiles the real sharded train",
        "step for a TPU slice on a machine without a TPU (JAX topology",
        "descriptions from the `libtpu` wheel: `pip install -e '.[tpu]'`) and",
        "reports per-chip HBM against the chip's capacity, FLOPs per step, and a",
        "roofline estimate (the larger of model FLOPs at peak bf16 throughput, XLA's",
        "per-chip FLOPs at peak, and one pass over the per-chip HBM at peak",
        "bandwidth). The roofline is an upper bound on speed, not a measurement.",
        "",
        "Produced by `python bench/tpu_plan.py` with each config's own mesh",
        "(base presets: data parallel; 1b and 8b: fsdp over all chips) and batch.",
        "",
        "| config | slice | mesh (data x fsdp x tensor) | tokens / step | HBM per chip "
        "| roofline step | roofline MFU |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    lines += [row(name, r) for name, r in results]
    with open(os.path.join(REPO, "docs", "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(REPO, "docs", "tpu_plan.json"), "w") as f:
        json.dump([r for _, r in results], f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
