"""Experiments: one module per command, the runner, the shared settings, and sweeps across
models and checkpoints with their executors (local, Ray)."""
