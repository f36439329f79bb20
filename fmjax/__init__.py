"""fmjax: a JAX/Flax foundation-model stack."""

__version__ = "0.1.0"


def load(path: str):
    """Loads an fmjax workdir/export, or an HF BERT model directory, for use."""
    from fmjax.api import load as _load

    return _load(path)
