"""fmjax.host_memory: the malloc the `fmjax` command starts itself again
with. jemalloc keeps a jitted function's per-run temporaries mapped from run
to run; glibc's huge-page tunable makes them fault in 2 MiB at a time
instead of 4 KiB."""

import json
import os
import platform
import subprocess
import sys

import pytest

from fmjax import host_memory

CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp

# A 128 MiB temporary (the cumulative sums of the exponentials): XLA:CPU
# allocates it on every run of the executable.
f = jax.jit(lambda x: jnp.cumsum(jnp.exp(x), axis=0).sum())
x = jnp.ones((4096, 4096), jnp.float32) / 4096
for _ in range(5):  # jemalloc's arenas settle in the first few runs
    f(x).block_until_ready()
runs = int(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(runs):
    f(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults_per_run": (after - before) / runs}))
"""

THP = host_memory.transparent_huge_pages()
needs_thp = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or THP not in ("always", "madvise"),
    reason=f"needs glibc and transparent huge pages (kernel: {THP or 'unknown'})",
)


JEMALLOC = host_memory.jemalloc_library()
needs_jemalloc = pytest.mark.skipif(
    not JEMALLOC, reason=f"needs {host_memory.JEMALLOC_NAME} (Debian: libjemalloc2)"
)


def _faults_per_run(
    tunables: str | None, extra: dict | None = None, runs: int = 3
) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for key in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF"):
        env.pop(key, None)  # XLA_FLAGS: one device, as a user's process
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    env.update(extra or {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(runs)], env=env, capture_output=True,
        text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_run"]


@needs_thp
def test_huge_pages_fault_temporaries_in_2mib_at_a_time():
    pages = 128 * 2**20 / 4096  # the temporary's 4 KiB pages
    huge = _faults_per_run(host_memory.TUNABLE)
    assert huge < 0.05 * pages, huge
    if THP == "madvise":  # without the tunable glibc asks for no huge page
        assert _faults_per_run(None) > 0.5 * pages


@needs_jemalloc
def test_jemalloc_keeps_temporaries_mapped():
    pages = 128 * 2**20 / 4096
    extra = {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": host_memory.JEMALLOC_CONF}
    # Most runs reuse the last run's pages; now and then a run's block lands
    # on fresh ones (one block in the 8 runs: 1/8 of the pages a run).
    assert _faults_per_run(None, extra, runs=8) < 0.2 * pages
    # jemalloc's own defaults give blocks over 8 MiB back at once
    assert _faults_per_run(None, {"LD_PRELOAD": JEMALLOC}) > 0.5 * pages


def _reexec(setting: str, show: str, **environ) -> str:
    code = (
        "from fmjax.host_memory import reexec_with_malloc; "
        f"reexec_with_malloc(['-c', {show!r}]); exec({show!r})"
    )
    env = dict(os.environ, **environ, **{host_memory.ENV: setting})
    for key in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES"):
        if key not in environ:
            env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


@needs_jemalloc
def test_reexec_preloads_jemalloc_once_and_keeps_the_users_conf():
    show = (
        "import os, json; print(json.dumps([os.environ[k] for k in "
        "('LD_PRELOAD', 'MALLOC_CONF')]))"
    )
    preload, conf = json.loads(_reexec("auto", show))
    assert preload == JEMALLOC and conf == host_memory.JEMALLOC_CONF
    preload, conf = json.loads(_reexec("jemalloc", show, MALLOC_CONF="narenas:2"))
    assert preload == JEMALLOC and conf == "narenas:2"
    # the process is jemalloc's: its maps list the library
    maps = "print(any('jemalloc' in line for line in open('/proc/self/maps')))"
    assert _reexec("auto", maps) == "True"
    assert _reexec("system", maps) == "False"


@needs_thp
def test_reexec_sets_the_tunable_once():
    show = "import os; print(os.environ['GLIBC_TUNABLES'])"
    out = _reexec("huge_pages", show, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert out == f"glibc.malloc.arena_max=4:{host_memory.TUNABLE}"


def test_environ_gets_the_tunable_only_where_it_helps(monkeypatch):
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: "")
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "madvise")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    added = host_memory.malloc_environ({"PATH": "/bin"})  # auto: no jemalloc
    assert added == {"PATH": "/bin", "GLIBC_TUNABLES": host_memory.TUNABLE}
    assert host_memory.malloc_environ(added) is None  # already set: no loop
    assert host_memory.malloc_environ({host_memory.ENV: "system"}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "never")
    assert host_memory.malloc_environ({}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "always")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.malloc_environ({}) is None  # musl, macOS: no tunable


def test_auto_prefers_jemalloc_and_adds_it_once(monkeypatch):
    library = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: library)
    added = host_memory.malloc_environ({"LD_PRELOAD": "/opt/libx.so"})
    assert added == {
        "LD_PRELOAD": f"{library} /opt/libx.so",
        "MALLOC_CONF": host_memory.JEMALLOC_CONF,
    }
    assert host_memory.malloc_environ(added) is None
    assert host_memory.in_use(added) == f"jemalloc ({host_memory.JEMALLOC_CONF})"
    assert host_memory.in_use({"GLIBC_TUNABLES": host_memory.TUNABLE}) == (
        "glibc huge pages"
    )
    assert host_memory.in_use({}) == "system"
    huge = host_memory.malloc_environ({host_memory.ENV: "huge_pages"})
    assert huge is None or "LD_PRELOAD" not in huge


def test_bad_setting_and_missing_jemalloc_are_named(monkeypatch):
    expected = "FMJAX_MALLOC='tcmalloc'.*'auto', 'jemalloc', 'huge_pages', 'system'"
    with pytest.raises(ValueError, match=expected):
        host_memory.malloc_environ({host_memory.ENV: "tcmalloc"})
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: "")
    with pytest.raises(ValueError, match="no libjemalloc.so.2 in .*libjemalloc2"):
        host_memory.malloc_environ({host_memory.ENV: "jemalloc"})


def test_the_command_keeps_compiled_programs_on_disk(tmp_path):
    """`fmjax.cli.entry` starts the command with JAX's persistent compilation
    cache under $XDG_CACHE_HOME/fmjax/xla (a variable the user set wins): a
    process started with that environment writes its compiled program
    there."""
    from fmjax.cli import compilation_cache_environ

    assert (
        compilation_cache_environ({"JAX_COMPILATION_CACHE_DIR": "/x"})[
            "JAX_COMPILATION_CACHE_DIR"
        ]
        == "/x"
    )
    user = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPIL")}
    env = compilation_cache_environ({**user, "XDG_CACHE_HOME": str(tmp_path)})
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "fmjax" / "xla")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # keep even this one
    program = "import jax; jax.jit(lambda x: x * 2)(1.0)"
    subprocess.run([sys.executable, "-c", program], env=env, check=True)
    assert any(n.startswith("jit_") for n in os.listdir(tmp_path / "fmjax" / "xla"))


def test_the_command_starts_on_the_cpu_where_libtpu_finds_no_tpu():
    """Where the `libtpu` package is installed (the test extras install it)
    on a machine without TPU chips, JAX starts libtpu's runtime, which prints
    errors before JAX falls back to the CPU; `fmjax.cli.entry` starts the
    command with `cpu_where_no_tpu`'s JAX_PLATFORMS=cpu there, and JAX then
    starts on the CPU without a word from libtpu. A user's JAX_PLATFORMS is
    kept."""
    import glob
    import importlib.util

    from fmjax.cli import cpu_where_no_tpu

    assert cpu_where_no_tpu({"JAX_PLATFORMS": "tpu"}) == {"JAX_PLATFORMS": "tpu"}
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: JAX starts no TPU runtime")
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    if any(open(v).read().strip() == "0x1ae0" for v in vendors):
        pytest.skip("a Google PCI device (a TPU?) is attached")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    program = "import jax; print(jax.devices()[0].platform)"
    out = subprocess.run(
        [sys.executable, "-c", program], env=cpu_where_no_tpu(env),
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.split() == ["cpu"]
    assert "TPU" not in out.stderr, out.stderr
