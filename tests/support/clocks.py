"""A fake clock for the pure state machines (``clock=`` arguments): time moves only when a test sets ``t``."""
from __future__ import annotations


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t
