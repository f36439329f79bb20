"""fmjax.inference."""
