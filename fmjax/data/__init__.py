"""fmjax.data."""
