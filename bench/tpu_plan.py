"""Plan TPU jobs from this machine -> docs/scaling.md (and docs/tpu_plan.json).

Runs `fmjax compile` (AOT compilation of the real sharded train step for a TPU
topology description, no TPU needed) for the base presets and the 1B and 8B
decoders on v5e-16, v5p-64 and v5p-256, plus the 1B decoder data parallel (its
preset shards it fsdp over all chips) and both meshes at one 512-token row per
chip, to compare the two meshes' communication, and writes the table. Needs
the [tpu] extra (libtpu).

    python bench/tpu_plan.py [--reuse]
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = {"v5e-16": "v5e:4x4", "v5p-64": "v5p:2x4x4", "v5p-256": "v5p:4x4x8"}
DATA_PARALLEL = ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]
# One row of 512 tokens per chip of a v5p-256: little compute per byte sent.
SMALL = ["--config.data.batch_size=128", "--config.data.seq_len=512"]
# (config, extra flags, what the flags change, slices)
PLANS = [
    ("configs/bert_mlm.py:base", [], "", list(TOPOLOGIES)),
    ("configs/gpt_lm.py:base", [], "", list(TOPOLOGIES)),
    ("configs/gpt_lm.py:1b", [], "", list(TOPOLOGIES)),
    ("configs/gpt_lm.py:1b", DATA_PARALLEL, "data parallel", ["v5p-64", "v5p-256"]),
    ("configs/gpt_lm.py:1b", SMALL, "128 x 512 tokens", ["v5p-256"]),
    (
        "configs/gpt_lm.py:1b",
        SMALL + DATA_PARALLEL,
        "128 x 512 tokens, data parallel",
        ["v5p-256"],
    ),
    ("configs/gpt_lm.py:8b", [], "", list(TOPOLOGIES)),
]


def compile_one(config: str, topology: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fmjax.cli", "compile", "--config", config]
    cmd += ["--topology", topology, "--json", *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"
    return {"config": config, "topology": topology, "fits": False, "error": error}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def row(name: str, r: dict, note: str) -> str:
    config = f"`{r['config']}`" + (f" ({note})" if note else "")
    if "error" in r:
        reason = r["error"].split("): ")[-1].split(". Shard more")[0]
        return f"| {config} | {name} | - | - | does not fit: {reason} |" + " - |" * 6
    gib = r["hbm_total_bytes"] / 2**30
    cap = r["hbm_capacity_bytes"] / 2**30
    mesh = "x".join(str(v) for v in r["mesh"].values())
    units = r[r.get("unit", "tokens") + "_per_step"]
    sent = {k: c["ici_bytes"] for k, c in r["collectives"].items() if c["count"]}
    biggest = max(sent, key=sent.get, default="-")
    return (
        f"| {config} | {name} | {mesh} | {units:,} | "
        f"{gib:.1f} / {cap:.0f} GiB (args {r['hbm_argument_bytes'] / 2**30:.1f}, "
        f"temp {r['hbm_temp_bytes'] / 2**30:.1f}) | "
        f"{r['ici_bytes_per_chip'] / 2**30:.2f} GiB ({biggest}) | "
        f"{_ms(r['compute_s'])} | {_ms(r['hbm_s'])} | {_ms(r['communication_s'])} | "
        f"{r['bound']} | {r['roofline_mfu']:.0%} |"
    )


HEADER = """\
# Planning TPU jobs

`fmjax compile --config C --topology T` compiles the real sharded train
step for a TPU slice on a machine without a TPU (JAX topology
descriptions from the `libtpu` wheel: `pip install -e '.[tpu]'`) and
reports per-chip HBM against the chip's capacity, FLOPs per step, the
collectives the compiled program runs, and a roofline estimate: the largest
of three times, each at the chip's peak (`fmjax/aot.py:CHIPS`, from the Cloud
TPU spec sheets):

- **compute**: the model's FLOPs per chip (6 N + attention per token; or
  XLA's count, if larger) at peak bf16 throughput;
- **HBM**: one pass over the per-chip HBM the step uses;
- **communication**: what each chip sends in the step's all-gathers,
  reduce-scatters, all-reduces, all-to-alls and collective-permutes, read
  from the optimised HLO (a collective in a loop counted per iteration; ring
  algorithms: an all-reduce sends 2 (n-1)/n of its array, an all-gather or
  reduce-scatter (n-1)/n), at the chip's ICI bandwidth with every link busy
  (half the bidirectional per-chip figure: v5e 200 GB/s, v5p 600 GB/s).

The step is as fast as its slowest part if the three overlap perfectly, so
the roofline is an upper bound on speed, not a measurement; `bound` says
which part it is. MFU = model FLOPs / (chips x peak x roofline step).

Produced by `python bench/tpu_plan.py` with each config's own mesh
(base presets: data parallel; 1b and 8b: fsdp over all chips) and batch, and
the 1b decoder once more data parallel, and both meshes once more with one
row of 512 tokens per chip. ICI is what one chip sends per step (the largest
kind in brackets); compute, HBM and comm. are milliseconds.

How to read the mesh rows: fsdp gathers every weight in the forward pass, in
the rematerialised forward and in the backward pass and reduces the
gradients, data parallel only all-reduces the gradients once, so fsdp sends
more per chip; at a preset's batch the compute time hides either. With one
512-token row per chip, compute shrinks and the communication time, which
does not shrink with the batch, decides: that is where the roofline MFU of
the two meshes parts. Elsewhere an MFU below 100% means XLA's FLOP count
(which includes rematerialisation, but counts a loop's body once) is above
the model's 6 N + attention.

"""
COLUMNS = (
    "| config | slice | mesh (data x fsdp x tensor) | tokens / step | HBM per chip "
    "| ICI per chip | compute ms | HBM ms | comm. ms | bound | roofline MFU |\n"
    "|---|---|---|---:|---|---|---:|---:|---:|---|---:|"
)


def main():
    """`--reuse`: take the plans docs/tpu_plan.json already holds from there and
    compile only the others (each compile takes minutes on a CPU)."""
    path = os.path.join(REPO, "docs", "tpu_plan.json")
    previous = {}
    if "--reuse" in sys.argv[1:] and os.path.exists(path):
        with open(path) as f:
            for r in json.load(f):
                previous[(r["config"], r["topology"], r.get("flags", ""))] = r
    results = []
    for config, extra, note, slices in PLANS:
        for name in slices:
            result = previous.get((config, TOPOLOGIES[name], note))
            if result is None:
                print(f"compiling {config} {note} for {name} ...", flush=True)
                result = compile_one(config, TOPOLOGIES[name], extra)
            results.append((name, result, note))
    lines = (HEADER + COLUMNS).splitlines()
    lines += [row(name, r, note) for name, r, note in results]
    with open(os.path.join(REPO, "docs", "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path, "w") as f:
        plans = [{**r, "flags": note} if note else r for _, r, note in results]
        json.dump(plans, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
