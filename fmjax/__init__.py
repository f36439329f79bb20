"""fmjax: a JAX/Flax foundation-model stack."""

from fmjax.host_memory import keep_freed_memory

__version__ = "0.1.0"

# Before JAX starts its threads: each step then reuses the last step's pages
# (fmjax/host_memory.py; FMJAX_MALLOC=system keeps glibc's defaults).
keep_freed_memory()


def load(path: str):
    """Loads an fmjax workdir/export, or an HF BERT model directory, for use."""
    from fmjax.api import load as _load

    return _load(path)
