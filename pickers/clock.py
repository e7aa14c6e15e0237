"""The one injected clock (DESIGN.md): pickers never read the time themselves.

Serving uses ``MonotonicClock``; the virtual-time cluster simulator passes a ``ManualClock`` it advances,
so the same decision code replays an hour of trace in seconds.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale; only differences mean anything."""
        ...


class MonotonicClock:
    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to."""

    __slots__ = ("_t",)

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def set(self, t: float) -> None:
        if t < self._t:
            raise ValueError(f"clock cannot go back from {self._t} to {t}")
        self._t = t

    def advance(self, dt: float) -> None:
        self.set(self._t + dt)
