"""fmjax.host_memory: glibc's huge-page tunable, which the `fmjax` command
starts itself again with, makes a jitted function's per-run temporaries
fault in 2 MiB at a time instead of 4 KiB."""

import json
import os
import platform
import subprocess
import sys

import pytest

from fmjax import host_memory

CHILD = r"""
import json, resource
import jax, jax.numpy as jnp

# A 128 MiB temporary (the cumulative sums of the exponentials): XLA:CPU
# allocates it on every run of the executable.
f = jax.jit(lambda x: jnp.cumsum(jnp.exp(x), axis=0).sum())
x = jnp.ones((4096, 4096), jnp.float32) / 4096
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults_per_run": (after - before) / 3}))
"""

THP = host_memory.transparent_huge_pages()
needs_thp = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or THP not in ("always", "madvise"),
    reason=f"needs glibc and transparent huge pages (kernel: {THP or 'unknown'})",
)


def _faults_per_run(tunables: str | None) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user's process
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_run"]


@needs_thp
def test_huge_pages_fault_temporaries_in_2mib_at_a_time():
    pages = 128 * 2**20 / 4096  # the temporary's 4 KiB pages
    huge = _faults_per_run(host_memory.TUNABLE)
    assert huge < 0.05 * pages, huge
    if THP == "madvise":  # without the tunable glibc asks for no huge page
        assert _faults_per_run(None) > 0.5 * pages


@needs_thp
def test_reexec_sets_the_tunable_once():
    show = "import os; print(os.environ['GLIBC_TUNABLES'])"
    code = (
        "from fmjax.host_memory import reexec_with_huge_pages; "
        f"reexec_with_huge_pages(['-c', {show!r}])"
    )
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    env.pop(host_memory.ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip() == f"glibc.malloc.arena_max=4:{host_memory.TUNABLE}"


def test_environ_gets_the_tunable_only_where_it_helps(monkeypatch):
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "madvise")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    added = host_memory.huge_pages_environ({"PATH": "/bin"})
    assert added == {"PATH": "/bin", "GLIBC_TUNABLES": host_memory.TUNABLE}
    assert host_memory.huge_pages_environ(added) is None  # already set: no loop
    assert host_memory.huge_pages_environ({host_memory.ENV: "system"}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "never")
    assert host_memory.huge_pages_environ({}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "always")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.huge_pages_environ({}) is None  # musl, macOS: no tunable


def test_bad_setting_is_named():
    expected = "FMJAX_MALLOC='jemalloc'.*'huge_pages'.*'system'"
    with pytest.raises(ValueError, match=expected):
        host_memory.huge_pages_environ({host_memory.ENV: "jemalloc"})
