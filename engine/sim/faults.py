"""Faults a simulated pod can be told to show, changed at run time (POST /sim/faults or the Python API).

Why: the picker must survive pods that fail requests, slow down, stop publishing KV events, or crash
and come back with an empty cache and KV event sequence numbers starting again at 0.
"""

from __future__ import annotations

import random

import msgspec


class FaultConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fault settings; every field optional in an update. Durations are simulated seconds."""

    error_rate: float = 0.0  # share of requests answered with error_status instead of being served
    error_status: int = 500
    error_message: str = "simulated failure"
    latency_s: float = 0.0  # added before a request is handled (scaled by the fleet's time_scale)
    events_enabled: bool = True  # False: KV events are dropped (the sequence number does not advance)


class FaultUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST /sim/faults: any FaultConfig field, plus the crash actions."""

    error_rate: float | None = None
    error_status: int | None = None
    error_message: str | None = None
    latency_s: float | None = None
    events_enabled: bool | None = None
    crash_for_s: float | None = None  # close the listener now, restart after this many wall seconds
    reset: bool = False  # back to no faults


class Faults:
    """The current fault settings of one pod and the random draw for error_rate."""

    def __init__(self, seed: int | None = None) -> None:
        self.config = FaultConfig()
        self._rng = random.Random(seed)

    def update(self, **changes: object) -> FaultConfig:
        """Change some settings (validated: unknown names and bad values raise ValueError)."""
        merged = msgspec.structs.asdict(self.config)
        unknown = set(changes) - set(merged)
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        merged.update({k: v for k, v in changes.items() if v is not None})
        try:
            cfg = msgspec.convert(merged, FaultConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        if not 0.0 <= cfg.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if not 400 <= cfg.error_status <= 599:
            raise ValueError("error_status must be an HTTP error status (400-599)")
        if cfg.latency_s < 0:
            raise ValueError("latency_s must not be negative")
        self.config = cfg
        return cfg

    def reset(self) -> None:
        self.config = FaultConfig()

    def should_fail(self) -> bool:
        rate = self.config.error_rate
        return rate > 0 and self._rng.random() < rate


__all__ = ["FaultConfig", "FaultUpdate", "Faults"]
