"""A KV cache that grows while decoding, so that early steps read fewer slots.

Each decode step's attention reads every slot of the cache, filled or not.
Where the cache is a large share of the bytes a step reads (several rows on
XLA:CPU), the Generator starts with room for the first 32 new tokens and
doubles that room between decode calls (the keys and values padded with
empty slots, masked like the rest until written): a 128-token generation
after a 128-token prompt reads 160, 192 and then 256 slots instead of 256
throughout. Each size is one more compile of the decode loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def grows_cache(cfg, rows: int, slots: int, param_bytes: int) -> bool:
    """Whether decoding `rows` rows into a cache of `slots` slots grows it
    (`capacities`): on XLA:CPU, where the whole cache's keys and
    values would take at least a quarter of the params' bytes (gpt_lm:small
    from 4 rows up, with a 128-token prompt and 128 new tokens; not 1 row,
    whose decode loop with kernels in parts takes seconds to compile)."""
    if jax.default_backend() != "cpu":
        return False
    itemsize = np.dtype(cfg.compute_dtype).itemsize
    cache_bytes = 2 * cfg.num_layers * rows * slots * cfg.kv_heads * cfg.head_dim
    return 4 * cache_bytes * itemsize >= param_bytes


def capacities(
    cfg, rows: int, width: int, new_slots: int, param_bytes: int, first: int = 32
) -> list[int]:
    """The cache's room for new tokens (after a prompt `width` slots wide)
    before each growth: [new_slots] where it does not grow (`grows_cache`),
    else `first`, doubled each time, up to `new_slots`."""
    if not grows_cache(cfg, rows, width + new_slots, param_bytes):
        return [new_slots]
    rooms = [min(first, new_slots)]
    while rooms[-1] < new_slots:
        rooms.append(min(2 * rooms[-1], new_slots))
    return rooms


@functools.partial(jax.jit, static_argnames="extra")
def grow(state, extra: int):
    """`state` (a `generate.DecodeState`) with `extra` empty slots at the end of
    every layer's cache, and of `valid_BS` (True: the mask's causal part keeps
    a query from slots past its own)."""

    def padded(x_NSK):
        return jnp.pad(x_NSK, ((0, 0), (0, extra), (0, 0)))

    cache = [dict(c, k=padded(c["k"]), v=padded(c["v"])) for c in state.cache]
    valid_BS = jnp.pad(state.valid_BS, ((0, 0), (0, extra)), constant_values=True)
    return state._replace(cache=cache, valid_BS=valid_BS)
