"""Model pipelines: one module per card ``pipeline`` name (pre-process, infer, post-process)."""
