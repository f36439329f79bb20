"""fmjax.host_memory: with `import fmjax`'s malloc settings, a jitted function
run again reuses its last run's temporaries instead of page-faulting fresh
memory; with FMJAX_MALLOC=system (glibc's defaults) it faults them all in."""

import json
import os
import platform
import subprocess
import sys

import pytest

from fmjax import host_memory

CHILD = r"""
import json, resource
import fmjax  # sets the malloc parameters before JAX starts its threads
import jax, jax.numpy as jnp

# A 64 MiB temporary: XLA:CPU allocates it on every run of the executable.
f = jax.jit(lambda x: (jnp.exp(x) @ x).sum())
x = jnp.ones((4096, 4096), jnp.float32) / 4096
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults_per_run": (after - before) / 3}))
"""

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)


def _faults_per_run(setting: str) -> float:
    env = dict(os.environ, FMJAX_MALLOC=setting, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user's process
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_run"]


@glibc_only
def test_runs_reuse_their_temporaries():
    system, reuse = _faults_per_run("system"), _faults_per_run("reuse")
    pages = 4096 * 4096 * 4 / 4096  # the temporary's 4 KiB pages
    assert system > 0.5 * pages, system  # glibc maps the block anew every run
    assert reuse < 0.05 * pages, reuse  # fmjax's settings: the pages are reused


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "jemalloc")
    with pytest.raises(ValueError, match="FMJAX_MALLOC='jemalloc'.*'reuse'.*'system'"):
        host_memory.keep_freed_memory()


def test_system_setting_changes_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "system")
    assert host_memory.keep_freed_memory() is False
