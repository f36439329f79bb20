"""fmjax.adapt."""
