"""Host memory: keep XLA's per-step temporaries mapped from step to step.

XLA:CPU allocates the temporaries of each run of an executable as one block
and frees it when the run ends. glibc serves a block that large with a fresh
`mmap` and unmaps it on free, so every step page-faults its whole working
set in again, and the kernel zeroes every page it hands back: 140-160k
minor faults and 0.4-0.6 s of kernel CPU time a step for `gpt_lm:small`,
`bert_mlm:small` and `clip:small` on a 2-core machine (docs/performance.md).

The `fmjax` command starts itself again (`reexec_with_malloc`), before it
imports JAX, with one of two remedies, chosen by `FMJAX_MALLOC`:

- `jemalloc` (the default where its library is installed: Debian's and
  Ubuntu's `libjemalloc2`, Fedora's `jemalloc`): jemalloc takes over
  `malloc` (`LD_PRELOAD`) with `JEMALLOC_CONF`: blocks of any size come
  from its arenas (`oversize_threshold:0`) and freed pages stay mapped
  (`dirty_decay_ms:-1`), so the next step reuses the last step's pages
  without a fault. The price is memory: the process keeps its peak until
  it ends, and where a step's blocks do not land on the last step's, more
  than that (peak resident memory of the `small` configs: +0-50%,
  docs/performance.md). Intel's recipes for PyTorch on CPUs preload
  jemalloc to keep freed pages the same way (`dirty_decay_ms:9000000000`).
  `FMJAX_MALLOC=huge_pages` where memory is tight.
- `huge_pages` (the default without jemalloc): glibc (2.35 and later) asks
  the kernel for transparent huge pages for what it maps
  (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): the block still faults in every
  step, but 2 MiB at a time (under a thousand faults a step).

`system` keeps the C library's malloc as it is; `auto` (the default) picks
`jemalloc` when its library is found, else `huge_pages`. Both remedies are
read only when a process starts: in your own Python process, set them in
the environment that starts Python, e.g. `LD_PRELOAD=$(python -c "import
fmjax.host_memory as m; print(m.jemalloc_library())") MALLOC_CONF=...
python train.py`, or `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python
train.py`. A `MALLOC_CONF` of your own is kept.

A first version kept freed memory in glibc's heap instead (`mallopt`: one
arena, no `mmap`, no trimming). Its steps faulted nothing once the heap had
settled, but until then freed blocks did not fit the next step's pattern of
allocations and the heap grew, to 3.6 GiB for `bert_mlm:small` (1.3 GiB with
glibc's defaults).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "FMJAX_MALLOC"
SETTINGS = ("auto", "jemalloc", "huge_pages", "system")
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_NAME = "libjemalloc.so.2"
LIBRARY_DIRS = ("/usr/local/lib", "/usr/lib64", "/usr/lib", "/lib64", "/lib")


def transparent_huge_pages() -> str:
    """The kernel's THP mode (`always`, `madvise`, `never`), or "" if unknown."""
    try:
        with open(THP_SETTING) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _library_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [os.path.join(d, multiarch) for d in ("/usr/lib", "/lib") if multiarch]
    return dirs + list(LIBRARY_DIRS)


def jemalloc_library() -> str:
    """The path of jemalloc's shared library, or "" where none is installed
    (or the C library is not glibc: no `LD_PRELOAD` of it there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return ""
    for directory in _library_dirs():
        path = os.path.join(directory, JEMALLOC_NAME)
        if os.path.isfile(path):
            return path
    return ""


def _setting(environ) -> str:
    setting = environ.get(ENV, "auto")
    if setting not in SETTINGS:
        expected = ", ".join(repr(s) for s in SETTINGS)
        raise ValueError(f"{ENV}={setting!r}: expected one of {expected}")
    if setting == "auto":
        return "jemalloc" if jemalloc_library() else "huge_pages"
    return setting


def malloc_environ(environ) -> dict | None:
    """`environ` with `FMJAX_MALLOC`'s remedy added (see the module doc), or
    None when there is nothing to add: already added (so a process started
    with it does not start itself again), `system`, or `huge_pages` where
    the C library is not glibc or the kernel's huge pages are off."""
    setting = _setting(environ)
    if setting == "jemalloc":
        library = jemalloc_library()
        if not library:
            raise ValueError(
                f"{ENV}=jemalloc: no {JEMALLOC_NAME} in {', '.join(_library_dirs())}"
                " (Debian and Ubuntu: apt-get install libjemalloc2); set "
                f"{ENV}=auto or huge_pages to go on without it"
            )
        preload = environ.get("LD_PRELOAD", "")
        if JEMALLOC_NAME in preload:
            return None
        return {
            **environ,
            "LD_PRELOAD": " ".join(filter(None, (library, preload))),
            "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF),
        }
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        setting == "system"
        or "glibc.malloc.hugetlb" in tunables
        or platform.libc_ver()[0] != "glibc"
        or transparent_huge_pages() not in ("always", "madvise")
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


def in_use(environ) -> str:
    """Which malloc a process started with `environ` runs: `jemalloc
    (MALLOC_CONF)`, `glibc huge pages` or `system`."""
    if JEMALLOC_NAME in environ.get("LD_PRELOAD", ""):
        return f"jemalloc ({environ.get('MALLOC_CONF', 'its defaults')})"
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return "glibc huge pages"
    return "system"


def reexec_with_malloc(argv: list[str]) -> None:
    """Replaces this process by `python *argv` with `malloc_environ`'s
    remedy, unless it has nothing to add (then returns)."""
    environ = malloc_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], environ)
