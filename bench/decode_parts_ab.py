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

`--packed` times the kernels in column parts (4+ rows) or whole against
`dense.Packed` kernels (`fmjax.native`'s product, 2-32 rows; the default
where it builds):

    python bench/decode_parts_ab.py --packed --batch 2 4 8 --rounds 9

`--attention` times the decoding attention's products over the cache as
XLA's batched dots against `fmjax.native`'s (`native.cache_scores`,
`cache_values`; kernels packed on both sides):

    python bench/decode_parts_ab.py --attention --batch 1 8 --rounds 7

`--growth` times instead a cache made whole at the prefill against one that
grows while decoding (`fmjax.inference.cache_growth`; the kernels in their
default parts on both sides):

    python bench/decode_parts_ab.py --growth --batch 4 8 --rounds 11
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np
from profile_decode import random_generator


def step_timer(generator, prompts, new_tokens: int, setup):
    """A function that calls `setup()` (which installs one side's policy),
    decodes once and returns (seconds a step, tokens)."""
    from fmjax.inference.sampling import Sampling

    def run():
        setup()
        stream = generator.stream_ids(prompts, new_tokens, Sampling(), chunk=new_tokens)
        next(stream)  # the prefill and the first token
        started = time.perf_counter()
        *_, tokens = stream
        return (time.perf_counter() - started) / (new_tokens - 1), tokens

    run()  # compiles
    return run


def main() -> int:
    from fmjax import native
    from fmjax.host_memory import reexec_with_malloc
    from fmjax.inference import cache_growth
    from fmjax.models import dense

    reexec_with_malloc(sys.argv)  # as the `fmjax` command

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt_lm.py:small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", type=int, default=0)
    parser.add_argument("--growth", action="store_true")
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--attention", action="store_true")
    args = parser.parse_args()
    cfg, generator = random_generator(args.config)
    generators = collections.defaultdict(lambda: generator)
    own, grows = dense.decoding_parts, cache_growth.grows_cache

    fits = native.cache_attention_fits

    def policy(parts=own, growth=grows, fits=fits):
        def setup():
            dense.decoding_parts, cache_growth.grows_cache = parts, growth
            native.cache_attention_fits = fits

        return setup

    if args.growth:
        sides = {"whole": policy(growth=lambda *a: False), "growing": policy()}
    elif args.attention:
        sides = {
            "xla": policy(fits=lambda *a: False),
            "native": policy(),
        }
        # Its own Generator (the same weights): jitted code is cached by
        # the params' form, which both sides share.
        generators["xla"] = random_generator(args.config)[1]
    elif args.packed:
        unpacked = lambda rows, size, float32=True: own(rows, size, False)  # noqa: E731
        sides = {"parts": policy(parts=unpacked), "packed": policy()}
    else:
        forced = lambda rows, size, f32=True: dense.PartCounts(args.parts, args.parts)  # noqa: E731
        sides = {
            "whole": policy(parts=lambda rows, size, float32=True: None),
            "parts": policy(parts=forced if args.parts else own),
        }
    rng = np.random.default_rng(0)
    for batch in args.batch:
        prompts = rng.integers(5, cfg.vocab_size, size=(batch, args.prompt)).tolist()
        timers = {
            side: step_timer(generators[side], prompts, args.new_tokens, setup)
            for side, setup in sides.items()
        }
        steps = {side: [] for side in sides}
        tokens = {}
        for _ in range(args.rounds):
            for side, run in timers.items():
                seconds, tokens[side] = run()
                steps[side].append(seconds)
        (a, b), (ta, tb) = sides, (np.median(steps[x]) * 1e3 for x in sides)
        same = bool((tokens[a] == tokens[b]).all())
        print(
            f"batch {batch}: {a} {ta:.3f} ms, {b} {tb:.3f} ms a step, "
            f"{a}/{b} {ta / tb:.3f}, same tokens {same}"
        )
    policy()()
    return 0


if __name__ == "__main__":
    sys.exit(main())
