"""Proxy evaluation: lm-eval tasks scored on an in-memory model (fast path and lm-eval path)."""
