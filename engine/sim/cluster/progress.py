"""Progress of a long replay on stderr: one updating line on a terminal, a line every few seconds otherwise.

A replay of an hour of traffic runs for tens of seconds to minutes; the line says how far it got in
simulated time, how many requests arrived and ended, the wall time so far and an estimate of what is left
(from the share of simulated time done, which tracks wall time closely for a steady trace).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ReplayProgress:
    """``progress(sim_time, arrived, ended)`` for ``ClusterSim.progress``; ``close()`` ends the line."""

    def __init__(self, label: str, total_requests: int, horizon_s: float, stream: TextIO | None = None,
                 every_s: float | None = None) -> None:
        self.label = label
        self.total = total_requests
        self.horizon = max(horizon_s, 1e-9)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.5 if self.tty else 10.0)
        self._start = time.perf_counter()
        self._last = -float("inf")
        self._shown = False

    def __call__(self, sim_time: float, arrived: int, ended: int) -> None:
        wall = time.perf_counter() - self._start
        if wall - self._last < self.every_s:
            return
        self._last = wall
        self.stream.write(("\r" if self.tty else "") + self.line(sim_time, arrived, ended, wall)
                          + ("" if self.tty else "\n"))
        self.stream.flush()
        self._shown = True

    def line(self, sim_time: float, arrived: int, ended: int, wall: float) -> str:
        done = min(1.0, max(sim_time / self.horizon, ended / max(1, self.total)))
        eta = f"{wall * (1 - done) / done:.0f}s" if done > 0.01 else "?"
        return (f"{self.label}: sim {sim_time:,.0f}/{self.horizon:,.0f} s, {ended:,}/{self.total:,} requests "
                f"done ({arrived:,} arrived), wall {wall:.0f} s, ETA {eta}   ")

    def close(self) -> None:
        if self._shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()


__all__ = ["ReplayProgress"]
