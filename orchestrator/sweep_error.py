"""The error of a sweep that cannot start or continue, raised by its plan, its cluster and its resume alike."""

from __future__ import annotations


class SweepError(RuntimeError):
    """The sweep cannot start or continue; the message says how to fix it."""
