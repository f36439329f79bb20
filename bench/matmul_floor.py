"""The matmuls of a training step, each alone: how long the step's matmuls
take by themselves on XLA:CPU and in PyTorch, next to both whole steps
(the matmul-floor numbers of docs/benchmarks.md).

Takes every `dot_general` of fmjax's full optimizer step of `--config`
(forward, backward and update, from the jaxpr `fmjax bench train` compiles;
a scan's body counted once per iteration), and times each distinct product
alone, on the benchmark's threads, operands hot in cache:
- on XLA:CPU, in a jitted loop of the product (an optimization barrier keeps
  it in the loop), compiled once with XLA:CPU's default libraries and once
  with YNNPACK's dots off (Eigen's), the faster of the two taken;
- in PyTorch, as `torch.einsum` of the same operands.
Summed over the step, these are what the step's matmuls cost with nothing
else in the way: no step on that library can take less. The whole steps
(fmjax and, with `--against hf`, HF's, in a process of its own) are timed
in the same run, alternating, as `fmjax bench train` times them, and the
step a target speedup over HF allows is set against the XLA floor.

    python bench/matmul_floor.py --config configs/vit_mae.py:small --against hf
    python bench/matmul_floor.py --config configs/clip.py:small --against hf \\
        --json docs/matmul_floor_clip.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import string
import sys
import time

import numpy as np

# XLA:CPU with YNNPACK's dot fusions off (Eigen's dots), elementwise and
# reduction fusions kept.
EIGEN_DOTS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    )
}


def _subjaxprs(eqn):
    """(jaxpr, times it runs per run of `eqn`) for each jaxpr in its params."""
    from jax.extend import core

    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr, times
            elif isinstance(item, core.Jaxpr):
                yield item, times


def train_step_jaxpr(config, batch: dict):
    """The jaxpr of fmjax's full optimizer step of `config` on `batch`
    (forward, backward and update), as `fmjax bench train` compiles it."""
    from fmjax import sharding as shd
    from fmjax.bench import jitted_train_step

    step_fn, state, global_batch, mesh, _ = jitted_train_step(config, batch)
    with shd.activate(mesh, config.mesh.rules):
        return step_fn.trace(state, global_batch).jaxpr


def step_dots(jaxpr, times: int = 1, counts=None) -> collections.Counter:
    """{(lhs shape, rhs shape, dtype, dimension numbers): count} of every
    dot_general a run of `jaxpr` does."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            dims = eqn.params["dimension_numbers"]
            dims = tuple(tuple(tuple(d) for d in pair) for pair in dims)
            counts[(lhs.shape, rhs.shape, str(lhs.dtype), dims)] += times
        for sub, n in _subjaxprs(eqn):
            step_dots(sub, times * n, counts)
    return counts


def dot_flops(signature) -> float:
    """2 x every lhs element x the rhs's free (not batch, not contracted) size."""
    lhs, rhs, _, ((_, rc), (_, rb)) = signature
    free = [n for j, n in enumerate(rhs) if j not in rc and j not in rb]
    return 2.0 * float(np.prod(lhs)) * float(np.prod(free))


def einsum_equation(signature) -> str:
    """dot_general's dimension numbers as an einsum equation (output: batch,
    lhs free, rhs free dims, dot_general's order)."""
    lhs, rhs, _, ((lc, rc), (lb, rb)) = signature
    letters = iter(string.ascii_letters)
    lhs_ix = [next(letters) for _ in lhs]
    rhs_ix = [next(letters) for _ in rhs]
    for i, j in zip(lc + lb, rc + rb, strict=True):
        rhs_ix[j] = lhs_ix[i]
    out = [lhs_ix[i] for i in lb]
    out += [c for i, c in enumerate(lhs_ix) if i not in lc and i not in lb]
    out += [c for j, c in enumerate(rhs_ix) if j not in rc and j not in rb]
    return f"{''.join(lhs_ix)},{''.join(rhs_ix)}->{''.join(out)}"


def _seconds(run, target_s: float = 0.02, repeats: int = 5) -> float:
    """Seconds of one product: `run(n)` does about n products and returns how
    many it did; the least of `repeats` timings of about `target_s` each."""
    run(1)
    start = time.perf_counter()
    done = run(1)
    n = max(1, int(target_s / max(time.perf_counter() - start, 1e-6) * done))
    run(n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = run(n)
        best = min(best, (time.perf_counter() - start) / done)
    return best


def xla_seconds(signature, compiler_options: dict) -> float:
    """One product of `signature` on XLA:CPU, in a jitted loop."""
    import jax
    import jax.numpy as jnp

    lhs, rhs, dtype, dims = signature
    a, b = jnp.ones(lhs, dtype), jnp.ones(rhs, dtype)

    def loop(a, b, n):
        def body(_, carry):
            a, b, c = carry
            x, y, _ = jax.lax.optimization_barrier((a, b, c))  # stays in the loop
            out = jax.lax.dot_general(x, y, dims)
            return a, b, c + out[(0,) * out.ndim]

        return jax.lax.fori_loop(0, n, body, (a, b, jnp.zeros((), dtype)))[2]

    compiled = jax.jit(loop, compiler_options=compiler_options).lower(a, b, 1).compile()

    def run(n):
        jax.block_until_ready(compiled(a, b, n))
        return n

    return _seconds(run)


def xla_loop_seconds(compiler_options: dict) -> float:
    """The loop's own time an iteration, which `main` takes off every
    product's: `xla_seconds` of an 8 x 8 product (about 0.7 us here; a 1 x 1
    product becomes a scalar multiply in the loop's own code, 0.02 us)."""
    eight = ((8, 8), (8, 8), "float32", (((1,), (0,)), ((), ())))
    return xla_seconds(eight, compiler_options)


def torch_seconds(signature, threads: int) -> float:
    """One product of `signature` as torch.einsum."""
    import torch

    torch.set_num_threads(threads)
    lhs, rhs, dtype, _ = signature
    equation = einsum_equation(signature)
    a = torch.ones(lhs, dtype=getattr(torch, dtype))
    b = torch.ones(rhs, dtype=getattr(torch, dtype))

    def run(n):
        for _ in range(n):
            torch.einsum(equation, a, b)
        return n

    return _seconds(run)


def _hf_step(config, batch: dict, threads: int):
    """HF's step of the config on `batch` (`fmjax bench train --against
    hf`'s), in a process of its own."""
    from fmjax.bench import hf_text_step
    from fmjax.bench_clip import _hf_step as pairs_step
    from fmjax.bench_rounds import in_child
    from fmjax.bench_vision import _hf_step as images_step
    from fmjax.tasks import task_for

    unit = task_for(config, with_data=False).throughput_unit
    if unit == "tokens":  # HF's text step makes its own batch of the same shape
        return in_child(hf_text_step, config, threads)[0]
    build = images_step if unit == "images" else pairs_step
    return in_child(build, config, batch, threads)[0]


def main() -> int:
    from fmjax.bench import fmjax_train_step, random_train_batch
    from fmjax.bench_rounds import alternate_rounds
    from fmjax.config import load_config
    from fmjax.host_memory import reexec_with_malloc

    # As the `fmjax` command: jemalloc where installed (fmjax.host_memory);
    # without it, vit_mae:small's step took 1.5x as long.
    reexec_with_malloc(sys.argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/vit_mae.py:small")
    parser.add_argument("--against", default="", choices=("", "hf"))
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    threads = int(os.environ.get("FMJAX_BENCH_THREADS", os.cpu_count() or 1))
    config = load_config(args.config)
    batch = random_train_batch(config)
    dots = step_dots(train_step_jaxpr(config, batch))
    run, compiled, _ = fmjax_train_step(config, batch)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    steppers = {"fmjax": run}
    if args.against:
        steppers["hf"] = _hf_step(config, batch, threads)
    steps = {
        side: float(np.median(t))
        for side, t in alternate_rounds(steppers, 2, args.steps, args.rounds).items()
    }
    loop_s = {"default": xla_loop_seconds({}), "eigen": xla_loop_seconds(EIGEN_DOTS)}
    signatures = sorted(dots, key=lambda s: -dot_flops(s) * dots[s])
    rows = []
    for signature in signatures:
        xla = {
            name: max(0.0, xla_seconds(signature, options) - loop_s[name])
            for name, options in (("default", {}), ("eigen", EIGEN_DOTS))
        }
        rows.append({
            "lhs": list(signature[0]), "rhs": list(signature[1]),
            "einsum": einsum_equation(signature), "count": dots[signature],
            "flops": dot_flops(signature), "xla_s": xla,
        })  # fmt: skip
    if args.against:  # after every XLA timing: torch's threads spin a while
        for row, signature in zip(rows, signatures, strict=True):
            row["torch_s"] = torch_seconds(signature, threads)
    result = summary(rows, steps, float(cost.get("flops", 0.0)), args)
    result.update(config=args.config, threads=threads, xla_loop_s=loop_s, rows=rows)
    print_result(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def summary(rows, steps: dict, xla_flops: float, args) -> dict:
    """The step's matmuls summed per library, and what the target allows."""
    total = lambda key: sum(r["count"] * key(r) for r in rows)  # noqa: E731
    result = {
        "step_s": steps,
        "matmul_flops": total(lambda r: r["flops"]),
        "xla_cost_analysis_flops": xla_flops,
        "xla_matmuls_s": total(lambda r: min(r["xla_s"].values())),
        "xla_default_matmuls_s": total(lambda r: r["xla_s"]["default"]),
    }
    if "hf" in steps:
        result["torch_matmuls_s"] = total(lambda r: r["torch_s"])
        result["target"] = args.target
        result["step_allowed_s"] = steps["hf"] / args.target
        result["speedup_vs_hf"] = steps["hf"] / steps["fmjax"]
        result["speedup_if_only_xla_matmuls"] = steps["hf"] / result["xla_matmuls_s"]
    return result


def print_result(r: dict) -> None:
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    products = sum(x["count"] for x in r["rows"])
    print(
        f"{r['config']}: {products} products a step, "
        f"{r['matmul_flops'] / 1e9:.2f} GFLOP (XLA's count of the whole step: "
        f"{r['xla_cost_analysis_flops'] / 1e9:.2f})"
    )
    for row in r["rows"][:12]:
        torch_s = f", torch {row['torch_s'] * 1e6:.0f} us" if "torch_s" in row else ""
        print(
            f"  {row['count']:3d} x {row['einsum']:16s} {row['lhs']} {row['rhs']}: "
            f"XLA {row['xla_s']['default'] * 1e6:.0f} us "
            f"(Eigen {row['xla_s']['eigen'] * 1e6:.0f}){torch_s}"
        )
    print("steps: " + ", ".join(f"{k} {ms(v)}" for k, v in r["step_s"].items()))
    torch_s = r.get("torch_matmuls_s")
    print(
        f"the matmuls alone: XLA:CPU {ms(r['xla_matmuls_s'])} (default libraries "
        f"{ms(r['xla_default_matmuls_s'])})"
        + (f", torch.einsum {ms(torch_s)}" if torch_s else "")
    )
    if "step_allowed_s" in r:
        print(
            f"{r['target']}x HF allows a step of {ms(r['step_allowed_s'])}; fmjax "
            f"is {r['speedup_vs_hf']:.2f}x HF; a step of XLA's matmuls alone "
            f"would be {r['speedup_if_only_xla_matmuls']:.2f}x HF"
        )


if __name__ == "__main__":
    sys.exit(main())
