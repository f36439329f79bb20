"""Scoring requests packed as prefix trees (fmjax.inference.scoring): the
packing and its mask against brute force, and the log-likelihoods against each
request scored alone by a plain forward pass, with and without adapters."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import BOS, PAD, _adapter_kwargs, _decoder, _full_logits

from fmjax.inference.scoring import (
    Row,
    Scorer,
    pack_trees,
    shared_prefixes,
    tree_mask,
)

# Contexts with shared prefixes (a "few-shot" prefix, choices of one question)
# and unrelated ones; continuations of one and several tokens.
FEW_SHOT = [BOS, 40, 41, 42, 43, 44, 45]
REQUESTS = [
    (FEW_SHOT + [50, 51], [60]),
    (FEW_SHOT + [50, 51], [61]),
    (FEW_SHOT + [50, 51], [62, 63, 64]),
    (FEW_SHOT + [52], [60]),
    (FEW_SHOT + [52], [70, 71]),
    ([BOS, 9, 8, 7], [6, 5]),
    ([BOS, 9, 8], [7]),  # a prefix of another request's input
    ([BOS, 100], [101, 102, 103, 104]),
    ([BOS], [33]),
]


def _as_rows(requests):
    """(x, y, n) as FmjaxLM builds them."""
    rows = []
    for context, continuation in requests:
        whole = context + continuation
        rows.append((whole[:-1], whole[1:], len(continuation)))
    return rows


def _ancestors(row: Row) -> np.ndarray:
    """[W, W] brute force: slot j is on the root-to-slot path of slot i."""
    width = len(row.tokens)
    mask = np.zeros((width, width), bool)
    parent = {}
    stack = []
    for slot, depth in enumerate(row.depths):
        stack = stack[:depth]
        parent[slot] = stack[-1] if stack else -1
        stack.append(slot)
    for slot in range(width):
        j = slot
        while j != -1:
            mask[slot, j] = True
            j = parent[j]
    return mask


def test_pack_trees_lays_each_input_on_one_path_sharing_prefixes():
    inputs = [x for x, _, _ in _as_rows(REQUESTS)]
    rows = pack_trees(inputs, width=64)
    assert len(rows) == 1
    (row,) = rows
    # Every shared prefix is stored once: the slots are the distinct prefixes.
    prefixes = {tuple(x[: i + 1]) for x in inputs for i in range(len(x))}
    assert len(row.tokens) == len(prefixes) < sum(map(len, inputs))
    ancestors = _ancestors(row)
    for index, slots in row.inputs:
        x = inputs[index]
        assert [row.tokens[s] for s in slots] == x
        assert [row.depths[s] for s in slots] == list(range(len(x)))
        last = slots[-1]  # its path is exactly its ancestors
        assert sorted(np.flatnonzero(ancestors[last])) == sorted(slots)
    # The mask from subtree ends equals the brute-force ancestor mask.
    ends = jnp.asarray([row.ends()])
    np.testing.assert_array_equal(np.asarray(tree_mask(ends))[0, 0], ancestors)


def test_rows_split_at_the_width_and_repeat_a_prefix_per_row():
    inputs = [[BOS, 1, 2, 3, 4, 5, t] for t in range(10, 20)]
    rows = pack_trees(inputs, width=9)  # 6 shared + 3 leaves per row
    assert [len(r.tokens) for r in rows] == [9, 9, 9, 7]
    assert sorted(i for r in rows for i, _ in r.inputs) == list(range(10))
    with pytest.raises(ValueError, match="an input of 7 tokens > row width 6"):
        pack_trees(inputs, width=6)


def _alone(module, params, kwargs, context, continuation):
    """log p(continuation | context) and is_greedy from one plain forward pass
    over context + continuation."""
    whole = context + continuation
    logits = _full_logits(module, params, kwargs, [whole[:-1]])[0]
    logp = np.asarray(jax_log_softmax(logits))
    n = len(continuation)
    positions = range(len(whole) - 1 - n, len(whole) - 1)
    total = sum(logp[p, whole[p + 1]] for p in positions)
    greedy = all(logp[p].argmax() == whole[p + 1] for p in positions)
    return total, greedy


def jax_log_softmax(logits):
    import jax

    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


@pytest.mark.parametrize(
    "name, adapter, rows, width",
    [  # without adapters: tests/test_lm_eval.py's parity with HF
        ("learned", "prompt", 2, 16),  # several rows and calls
        ("rope_gqa", "prefix", 4, 64),
    ],
)
def test_tree_scores_equal_each_request_scored_alone(name, adapter, rows, width):
    module, params = _decoder(name)
    kwargs = _adapter_kwargs(adapter, module.config)
    scorer = Scorer(module, rows=rows, max_width=width, pad_id=PAD)
    got = scorer.score(params, kwargs, _as_rows(REQUESTS))
    for (context, continuation), (logp, greedy) in zip(REQUESTS, got, strict=True):
        want_logp, want_greedy = _alone(module, params, kwargs, context, continuation)
        assert logp == pytest.approx(want_logp, abs=1e-4)
        assert greedy == want_greedy
    assert scorer.calls >= 1


def test_shared_prefixes_group_sorted_inputs_short_of_scored_slots():
    inputs = [
        [1, 2, 3, 4, 5, 6, 7],
        [1, 2, 3, 4, 5, 9],
        [1, 2, 3, 4, 5, 6, 8],
        [7, 7, 7, 7],
        [1, 2],
    ]
    counts = [1, 1, 2, 1, 1]
    groups = shared_prefixes(inputs, counts, multiple=2)
    # [1, 2] sorts first but may share only 1 slot (its last is scored): it
    # stays alone. 0, 2, 1 share [1, 2, 3, 4, 5], input 2 short of its 2
    # scored slots: 5 of 7, rounded down to 4.
    assert groups == [(0, [4]), (4, [0, 2, 1]), (0, [3])]
    # sharing less than `multiple`: every input alone
    assert shared_prefixes(inputs, counts, multiple=8) == [
        (0, [i]) for i in (4, 0, 2, 1, 3)
    ]


@pytest.mark.parametrize("name", ["learned", "rope_gqa"])
def test_shared_prefix_scores_equal_each_request_scored_alone(name):
    """Without adapters the few-shot prefix is computed once (its keys and
    values in front of every row's cache, positions offset by it)."""
    module, params = _decoder(name)
    requests = REQUESTS + [
        (FEW_SHOT + [53, 54], [60]),
        (FEW_SHOT + [55, 56], [61, 62]),
        (FEW_SHOT + [57], [63, 64, 65]),
    ]
    # rows of 12 slots: FEW_SHOT's requests need 4 of them, so its first 6
    # tokens would be computed 3 more times, 18 slots >= a row
    scorer = Scorer(module, rows=2, max_width=12, pad_id=PAD, share_multiple=2)
    got = scorer.score(params, {}, _as_rows(requests))
    # FEW_SHOT, 7 tokens, rounded down to 6; [BOS, 9, 8] and [BOS, 9, 8, 7, 6]
    # share 2 slots too, but fit one row: not shared
    assert scorer.shared == [6]
    for (context, continuation), (logp, greedy) in zip(requests, got, strict=True):
        want_logp, want_greedy = _alone(module, params, {}, context, continuation)
        assert logp == pytest.approx(want_logp, abs=1e-4)
        assert greedy == want_greedy
