"""fmjax's attention softmax against `jax.nn.softmax`, one train step each,
in one process -> docs/performance.md.

`fmjax.models.attention.softmax` has a custom jvp that keeps only its output;
`jax.nn.softmax` has one only under JAX's `jax_softmax_custom_jvp` flag (off
by default in JAX 0.10). For each config this builds the full optimizer step
twice, once with each softmax in the attention (the name is looked up when
the step is traced), checks that both give the same loss and gradient norm,
and times them in alternating rounds (`fmjax.bench_rounds.alternate_rounds`).

    python bench/softmax_ab.py
    python bench/softmax_ab.py --configs configs/clip.py:small --rounds 8
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import build  # noqa: E402

from fmjax.host_memory import reexec_with_malloc  # noqa: E402

CONFIGS = ("configs/gpt_lm.py:small", "configs/clip.py:small")


def main() -> int:
    # As the `fmjax` command: XLA's temporaries kept mapped (fmjax.host_memory).
    reexec_with_malloc(sys.argv)
    import jax

    import fmjax.models.attention as attention
    from fmjax.bench_rounds import alternate_rounds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    softmaxes = {
        "jax.nn.softmax": functools.partial(jax.nn.softmax, axis=-1),
        "fmjax": attention.softmax,
    }
    for config in args.configs:
        steppers = {}
        for name, softmax in softmaxes.items():
            attention.softmax = softmax
            steppers[name] = build(config, [])[0]
        attention.softmax = softmaxes["fmjax"]
        for name, run in steppers.items():
            metrics = run()
            loss = metrics.get("loss", metrics.get("loss_sum"))
            print(
                f"{config} {name}: first step's loss {float(loss):.7g}, "
                f"gradient norm {float(metrics['grad_norm']):.7g}"
            )
        rounds = alternate_rounds(steppers, 2, args.steps, args.rounds)
        ms = {name: [s * 1e3 for s in r] for name, r in rounds.items()}
        for name, times in ms.items():
            print(
                f"{config} {name}: {statistics.median(times):.0f} ms a step "
                f"(rounds {' '.join(f'{t:.0f}' for t in times)})"
            )
        ratios = [b / a for a, b in zip(*ms.values(), strict=True)]
        print(
            f"{config}: fmjax / jax.nn.softmax, median of {len(ratios)} paired "
            f"rounds: {statistics.median(ratios):.3f} "
            f"(pairs {min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
