"""Capture and edit hook points: :class:`Trace` and addresses, right-padded batches and
windows of the last W real tokens, and generation with per-step capture."""

from rloop.capture.trace import (
    HookAddress,
    LastTokenLogits,
    StopForward,
    Trace,
    address,
    parse_address,
    run_with_trace,
)

__all__ = [
    "HookAddress",
    "LastTokenLogits",
    "StopForward",
    "Trace",
    "address",
    "parse_address",
    "run_with_trace",
]
