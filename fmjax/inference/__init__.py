"""Using trained models: generation (KV cache), and later scoring and search."""
