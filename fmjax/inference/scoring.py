"""Log-likelihoods of many continuations at once, each context token computed
once.

A request is (inputs x, targets y, n): the log-probability of y's last n
tokens, each read after x up to it (x is the context and continuation without
the last token; y the same tokens shifted by one). Requests are sorted by
their tokens and laid into rows as prefix trees: a request shares the slots of
the longest prefix it has in common with the row's previous request, so the
choices of a multiple-choice question share their context, and the questions
of a few-shot task with fixed exemplars share the exemplars. Slots are in
depth-first order, so each slot's subtree is a contiguous range [slot, end]:
a slot attends to slot j exactly when j <= slot <= end[j] (j is an ancestor or
itself), and its position is its depth. The decoder runs a row through an
empty KV cache with that mask (the cache path takes any mask), and the LM head
reads only the slots where a continuation is scored.

A prefix that requests in many rows share (the exemplars of a few-shot task
with fixed exemplars, as MMLU's) is computed once instead of once per row,
where that saves at least a row's slots: its keys and values are made by one
prefill and put in front of every row's cache, as prefix tuning's slots are,
and the rows hold what follows it (`shared_prefixes`, `Scorer._groups`; its
length is rounded down to a multiple of `SHARE_MULTIPLE`, so few lengths
compile).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.inference.generate import (
    _mask,
    _model_inputs,
    _num_prefix,
    _num_prompt,
    bucket,
)
from fmjax.models.attention import model_cache

# Rows are at least this wide, so many short requests share one.
PACK_WIDTH = 256
# Shared prefixes are computed once in lengths of multiples of this.
SHARE_MULTIPLE = 32


@dataclasses.dataclass
class Row:
    """One row's slots, depth first: token and depth (its position); and the
    inputs laid in it: (input index, its slots)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    depths: list[int] = dataclasses.field(default_factory=list)
    inputs: list[tuple[int, list[int]]] = dataclasses.field(default_factory=list)

    def ends(self) -> list[int]:
        """The last slot of each slot's subtree: the slot before the next one
        at the same depth or shallower."""
        ends = [len(self.tokens) - 1] * len(self.tokens)
        path: list[int] = []
        for slot, depth in enumerate(self.depths):
            while path and self.depths[path[-1]] >= depth:
                ends[path.pop()] = slot - 1
            path.append(slot)
        return ends


def pack_trees(inputs: Sequence[Sequence[int]], width: int) -> list[Row]:
    """Rows of at most `width` slots holding every input as a root-to-node
    path."""
    order = sorted(range(len(inputs)), key=lambda i: tuple(inputs[i]))
    rows: list[Row] = []
    previous: Sequence[int] = ()
    path: list[int] = []
    for i in order:
        x = inputs[i]
        if len(x) > width:
            raise ValueError(f"an input of {len(x)} tokens > row width {width}")
        shared = 0
        if rows:
            limit = min(len(previous), len(x))
            while shared < limit and previous[shared] == x[shared]:
                shared += 1
        if not rows or len(rows[-1].tokens) + len(x) - shared > width:
            rows.append(Row())
            shared = 0
        row = rows[-1]
        path = path[:shared]
        for depth in range(shared, len(x)):
            row.tokens.append(x[depth])
            row.depths.append(depth)
            path.append(len(row.tokens) - 1)
        row.inputs.append((i, list(path)))
        previous = x
    return rows


def shared_prefixes(
    inputs: Sequence[Sequence[int]], counts: Sequence[int], multiple: int
) -> list[tuple[int, list[int]]]:
    """Groups of inputs and the prefix length each group shares: [(length,
    input indices)], every input in one group. Inputs next to each other in
    sorted order join a group while they share at least `multiple` tokens
    with its first; the length is what all share, short of every input's
    last `counts` tokens (the scored slots), rounded down to a multiple of
    `multiple` (0: nothing shared)."""
    order = sorted(range(len(inputs)), key=lambda i: tuple(inputs[i]))
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        x = inputs[i]
        if groups:
            length, members = groups[-1]
            first = inputs[members[0]]
            shared = 0
            limit = min(length, len(x) - counts[i])
            while shared < limit and first[shared] == x[shared]:
                shared += 1
            if shared >= multiple:
                groups[-1] = (shared, [*members, i])
                continue
        groups.append((len(x) - counts[i], [i]))
    return [
        (length // multiple * multiple if len(members) > 1 else 0, members)
        for length, members in groups
    ]


def prefix_kv(module, params, tokens_1P):
    """The keys and values of one prefix [1, P] at positions 0..P-1, each
    [num_layers, P, G, K]: what `init_cache(prefix_kv=...)` puts in front of a
    cache."""
    width = tokens_1P.shape[1]
    slots_P = jnp.arange(width)
    out = module.apply(
        {"params": params},
        tokens_1P,
        positions_BL=slots_P[None],
        cache=model_cache(module.config, 1, width),
        mask_B1LS=_mask(jnp.ones((1, width), bool), slots_P),
        last_only=True,
    )
    k_GPK, v_GPK = (
        jnp.stack([layer[name] for layer in out["cache"]]) for name in ("k", "v")
    )
    return tuple(jnp.swapaxes(x_LGPK, 1, 2) for x_LGPK in (k_GPK, v_GPK))


def tree_mask(ends_BW, num_prefix: int = 0, num_prompt: int = 0):
    """[B, 1, T+W, P+T+W]: slot i reads slot j when j <= i <= ends[j]; every
    text slot also reads the P prefix-tuning slots and T soft tokens, which
    read the prefix and the soft tokens before them."""
    batch, width = ends_BW.shape
    i_W1 = jnp.arange(width)[:, None]
    tree_BWW = (i_W1.T <= i_W1)[None] & (i_W1[None] <= ends_BW[:, None, :])
    adapters = num_prefix + num_prompt
    if not adapters:
        return tree_BWW[:, None]
    text_BWS = jnp.concatenate(
        [jnp.ones((batch, width, adapters), bool), tree_BWW], axis=2
    )
    soft_TS = jnp.concatenate(
        [
            jnp.ones((num_prompt, num_prefix), bool),
            jnp.tril(jnp.ones((num_prompt, num_prompt), bool)),
            jnp.zeros((num_prompt, width), bool),
        ],
        axis=1,
    )
    soft_BTS = jnp.broadcast_to(soft_TS, (batch, *soft_TS.shape))
    return jnp.concatenate([soft_BTS, text_BWS], axis=1)[:, None]


def score_slots(
    module, params, kwargs, tokens_BW, depths_BW, ends_BW, select_BK, targets_BK
):
    """[B, K] log p(target) at the selected slots of packed tree rows and
    whether the target was the argmax there."""
    cfg = module.config
    batch, width = tokens_BW.shape
    num_prefix, num_prompt = _num_prefix(kwargs), _num_prompt(kwargs)
    slots = num_prefix + num_prompt + width
    cache = model_cache(cfg, batch, slots, kwargs.get("prefix_kv"))
    out = module.apply(
        {"params": params},
        tokens_BW,
        positions_BL=depths_BW,
        cache=cache,
        mask_B1LS=tree_mask(ends_BW, num_prefix, num_prompt),
        select_BK=select_BK,
        **_model_inputs(kwargs, prefill=True),
    )
    logp_BKV = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
    logp_BK = jnp.take_along_axis(logp_BKV, targets_BK[..., None], axis=-1)[..., 0]
    greedy_BK = jnp.argmax(logp_BKV, axis=-1) == targets_BK
    return logp_BK, greedy_BK


class Scorer:
    """Scores requests with one decoder: `score(requests)` -> [(log-likelihood,
    is_greedy)] in the requests' order, `rows` rows per compiled call."""

    def __init__(
        self,
        module,
        rows: int,
        max_width: int,
        pad_id: int,
        share_multiple: int = SHARE_MULTIPLE,
    ):
        self.module = module
        self.rows = rows
        self.max_width = max_width
        self.pad_id = pad_id
        self.share_multiple = share_multiple
        self.calls = 0  # compiled calls made (for tests and benchmarks)
        self.shared: list[int] = []  # the last call's prefixes computed once

    @functools.cached_property
    def _score(self):
        return jax.jit(functools.partial(score_slots, self.module))

    @functools.cached_property
    def _prefix_kv(self):
        return jax.jit(functools.partial(prefix_kv, self.module))

    def score(self, params, kwargs, requests, progress=None):
        """`requests`: (x, y, n) with len(x) == len(y) <= max_width, 1 <= n <=
        len(y). `progress(count)` is told as requests finish."""
        self.shared = []
        if not requests:
            return []
        groups = [(0, list(range(len(requests))))]
        if not kwargs:  # adapter slots come first in the cache: share nothing
            groups = self._groups(requests)
        results: list = [None] * len(requests)
        for shared, members in groups:
            group_kwargs = kwargs
            if shared:
                x = requests[members[0]][0]
                group_kwargs = {
                    "prefix_kv": self._prefix_kv(params, np.asarray([x[:shared]]))
                }
                self.shared.append(shared)
            group = [
                (x[shared:], y[shared:], n)
                for x, y, n in (requests[i] for i in members)
            ]
            width = self._width([x for x, _, _ in group])
            rows = pack_trees([x for x, _, _ in group], width)
            for first in range(0, len(rows), self.rows):
                batch = rows[first : first + self.rows]
                done = self._score_rows(
                    params, group_kwargs, group, batch, width, shared
                )
                for request, result in done:
                    results[members[request]] = result
                if progress is not None:
                    progress(len(done))
        return results

    def _groups(self, requests) -> list[tuple[int, list[int]]]:
        """`shared_prefixes` worth computing once: those that would otherwise
        be computed again in enough rows to add up to a row's slots (a group
        of its own costs a prefill and its partly filled rows); every other
        request in one group sharing nothing, first."""
        inputs, counts = zip(*((x, n) for x, _, n in requests), strict=True)
        width = self._width(inputs)
        shared, alone = [], []
        for length, members in shared_prefixes(inputs, counts, self.share_multiple):
            rows = pack_trees([inputs[i] for i in members], width) if length else []
            if length * (len(rows) - 1) >= width:
                shared.append((length, members))
            else:
                alone.extend(members)
        return ([(0, alone)] if alone else []) + shared

    def _width(self, inputs) -> int:
        longest = max(len(x) for x in inputs)
        return min(self.max_width, bucket(max(longest, PACK_WIDTH)))

    def _score_rows(
        self, params, kwargs, requests, rows: list[Row], width: int, offset: int
    ):
        """[(request, (log-likelihood, is_greedy))] of the requests in `rows`,
        one compiled call (rows padded to a power of two); the rows' tokens
        follow `offset` tokens whose keys and values are kwargs' prefix_kv."""
        batch = min(self.rows, bucket(len(rows), 1))
        tokens = np.full((batch, width), self.pad_id, np.int32)
        depths = np.zeros((batch, width), np.int32)
        ends = np.tile(np.arange(width, dtype=np.int32), (batch, 1))  # pads: self
        spans, selected = [], [[] for _ in range(batch)]
        for b, row in enumerate(rows):
            count = len(row.tokens)
            tokens[b, :count] = row.tokens
            depths[b, :count] = np.asarray(row.depths) + offset
            ends[b, :count] = row.ends()
            for request, slots in row.inputs:
                _, y, n = requests[request]
                start = len(selected[b])
                selected[b].extend(zip(slots[-n:], y[-n:], strict=True))
                spans.append((request, b, start, start + n))
        k = bucket(max(len(s) for s in selected), 8)
        select, targets = np.zeros((2, batch, k), np.int32)
        for b, pairs in enumerate(selected):
            if pairs:
                select[b, : len(pairs)], targets[b, : len(pairs)] = np.array(pairs).T
        logp, greedy = self._score(
            params, kwargs, tokens, depths, ends, select, targets
        )
        self.calls += 1
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [
            (request, (float(logp[b, a:z].sum()), bool(greedy[b, a:z].all())))
            for request, b, a, z in spans
        ]
