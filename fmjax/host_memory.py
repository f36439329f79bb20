"""Host memory: let a step reuse the last step's pages (glibc malloc settings).

XLA:CPU allocates the temporaries of each run of an executable as one block
(688 MiB for `clip:small`'s train step, 0.2-0.7 GiB for the other `small`
configs) from one of its worker threads. glibc serves a block that large with
a fresh `mmap` (a worker thread's arena cannot grow past 64 MiB, and then glibc
maps memory whatever `M_MMAP_MAX` says) and unmaps it when the run ends, so
every step page-faults its whole working set in again: 158-178k minor faults
and 0.27-0.34 s of kernel time a step for `gpt_lm:small`, `bert_mlm:small` and
`clip:small` on a 2-core machine (docs/performance.md).

`keep_freed_memory()` sets three glibc malloc parameters: one arena for all
threads (so big blocks come from the main heap), no `mmap` for big blocks,
and no trimming of the heap's free top below 2 GiB. The next step's block then
reuses the pages the last one freed. The price: the process keeps its peak
heap (its resident memory does not shrink after a big step), and threads share
one arena lock for allocations bigger than their thread cache.

`import fmjax` calls it, before JAX starts its threads, unless the environment
says `FMJAX_MALLOC=system`. It does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = -1  # read as an unsigned size: never trim
ENV = "FMJAX_MALLOC"


def keep_freed_memory() -> bool:
    """Sets the malloc parameters above; True where they were all accepted
    (glibc), False where this is not glibc or `FMJAX_MALLOC=system`."""
    setting = os.environ.get(ENV, "reuse")
    if setting not in ("reuse", "system"):
        raise ValueError(f"{ENV}={setting!r}: expected 'reuse' (default) or 'system'")
    if setting == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    accepted = [
        libc.mallopt(M_ARENA_MAX, 1),
        libc.mallopt(M_MMAP_MAX, 0),
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return all(accepted)
