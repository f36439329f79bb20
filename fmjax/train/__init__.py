"""fmjax.train."""
