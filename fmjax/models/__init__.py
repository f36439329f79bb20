"""fmjax.models."""
