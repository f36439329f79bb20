"""Decoding with kernels whole against kernels in column parts, in one process
(the in-process numbers of docs/benchmarks.md's "Kernels in column parts").

Builds the random decoder `fmjax bench decode` builds (default
`gpt_lm:small`), and at each batch size times the decode loop (the steps
after the first token) with whole kernels and with `Generator`'s kernel
parts (`dense.decoding_parts`, or `--parts N` at every batch size), in
alternating rounds, so both see the same machine state. Prints each side's
median step, their ratio, and whether the greedy tokens agree.

    python bench/decode_parts_ab.py                       # batch 1, 4, 8
    python bench/decode_parts_ab.py --batch 1 --parts 8
    python bench/decode_parts_ab.py --config configs/gpt_lm.py:base --batch 4 8
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from profile_decode import random_generator


def step_timer(generator, prompts, new_tokens: int, parts):
    """A function that decodes once with `parts` as `dense.decoding_parts` and
    returns (seconds a step, tokens)."""
    from fmjax.inference.sampling import Sampling
    from fmjax.models import dense

    def run():
        dense.decoding_parts = parts
        stream = generator.stream_ids(prompts, new_tokens, Sampling(), chunk=new_tokens)
        next(stream)  # the prefill and the first token
        started = time.perf_counter()
        *_, tokens = stream
        return (time.perf_counter() - started) / (new_tokens - 1), tokens

    run()  # compiles
    return run


def main() -> int:
    from fmjax.models import dense

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt_lm.py:small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", type=int, default=0)
    args = parser.parse_args()
    cfg, generator = random_generator(args.config)
    own = dense.decoding_parts
    sides = {
        "whole": lambda rows, size: None,
        "parts": (
            (lambda rows, size: dense.PartCounts(args.parts, args.parts))
            if args.parts
            else own
        ),
    }
    rng = np.random.default_rng(0)
    for batch in args.batch:
        prompts = rng.integers(5, cfg.vocab_size, size=(batch, args.prompt)).tolist()
        timers = {
            side: step_timer(generator, prompts, args.new_tokens, parts)
            for side, parts in sides.items()
        }
        steps = {side: [] for side in sides}
        tokens = {}
        for _ in range(args.rounds):
            for side, run in timers.items():
                seconds, tokens[side] = run()
                steps[side].append(seconds)
        whole, parts = (np.median(steps[side]) * 1e3 for side in sides)
        same = bool((tokens["whole"] == tokens["parts"]).all())
        print(
            f"batch {batch}: whole {whole:.3f} ms, parts {parts:.3f} ms a step, "
            f"whole/parts {whole / parts:.3f}, same tokens {same}"
        )
    dense.decoding_parts = own
    return 0


if __name__ == "__main__":
    sys.exit(main())
