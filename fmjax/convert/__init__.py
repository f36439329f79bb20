"""fmjax.convert."""
