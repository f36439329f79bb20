"""Stop strings, matched on the host as lm-evaluation-harness matches them:
where a text ends, and how much of a stream's end must wait to be shown."""

from __future__ import annotations

from collections.abc import Sequence


def truncate(text: str, stop: Sequence[str]) -> str:
    """`text` up to (without) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins a stop string: text a
    stream holds back until it knows whether the stop string follows."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
