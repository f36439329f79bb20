"""Host memory: back XLA's per-step temporaries with transparent huge pages.

XLA:CPU allocates the temporaries of each run of an executable as one block
and frees it when the run ends. glibc serves a block that large with a fresh
`mmap` and unmaps it on free, so every step page-faults its whole working
set in again, 4 KiB at a time: 140-160k minor faults and 0.4-0.6 s of kernel
CPU time a step for `gpt_lm:small`, `bert_mlm:small` and `clip:small` on a
2-core machine (docs/performance.md).

glibc (2.35 and later) can ask the kernel for transparent huge pages for what
it maps (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): the same block then faults
in 2 MiB at a time, under a thousand faults a step, and the steps took
0.67-0.85x the time. Memory use does not change:
glibc still unmaps each block when it is freed.

glibc reads its tunables only when a process starts, so the `fmjax` command
starts itself again with the tunable set (`reexec_with_huge_pages`), before
it imports JAX. In your own Python process, set it in the environment that
starts Python: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py`.
`FMJAX_MALLOC=system` keeps glibc's defaults. Nothing changes where the C
library is not glibc or the kernel's transparent huge pages are `never`.

A first version kept freed memory in the heap instead (`mallopt`: one arena,
no `mmap`, no trimming). Its steps faulted nothing once the heap had
settled, but until then freed blocks did not fit the next step's pattern of
allocations and the heap grew, to 3.6 GiB for `bert_mlm:small` (1.3 GiB with
glibc's defaults), and on a virtual machine the first touch of memory the
process never had cost ~45 us a page: 10-step runs took longer than with
glibc's defaults.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "FMJAX_MALLOC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages() -> str:
    """The kernel's THP mode (`always`, `madvise`, `never`), or "" if unknown."""
    try:
        with open(THP_SETTING) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def huge_pages_environ(environ) -> dict | None:
    """`environ` with glibc's huge-page tunable added, or None when there is
    nothing to add: already set, `FMJAX_MALLOC=system`, not glibc, or THP
    off in the kernel."""
    setting = environ.get(ENV, "huge_pages")
    if setting not in ("huge_pages", "system"):
        raise ValueError(
            f"{ENV}={setting!r}: expected 'huge_pages' (default) or 'system'"
        )
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        setting == "system"
        or "glibc.malloc.hugetlb" in tunables
        or platform.libc_ver()[0] != "glibc"
        or transparent_huge_pages() not in ("always", "madvise")
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


def reexec_with_huge_pages(argv: list[str]) -> None:
    """Replaces this process by `python *argv` with the tunable set, unless
    `huge_pages_environ` has nothing to add (then returns)."""
    environ = huge_pages_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], environ)
