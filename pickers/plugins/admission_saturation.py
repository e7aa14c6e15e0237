"""Saturation admission (GIE legacy): shed sheddable requests with 429 when the pool is saturated.

saturation = mean over ready decode pods with fresh metrics of max(waiting / queue_threshold, kv_usage /
kv_threshold), where waiting counts the requests flow control holds (pickers/flowcontrol.py) spread evenly
over the pods: with flow control the pods' own queues stay short past the knee. Stale metrics are no evidence
of saturation: by default a pod whose metrics are stale is left out of the mean (its signal is ignored, never
shed on), and ``stale_endpoints`` (exported by the scheduler as ``kvswitch_saturation_stale_endpoints``) says
how many were ignored at the last check; with no fresh pod at all nothing is shed.
``stale_counts_as_saturated: true`` restores the strict rule (a stale pod counts as saturated, 1.0). A request
is sheddable when its priority (``RequestState.slo``, from its objective: ``scheduler.objectives``) is
negative. This plugin's own ``objectives`` (name -> priority) still work: the config folds them into
``scheduler.objectives`` (a name given two priorities is a config error).
"""

from __future__ import annotations

import numpy as np

from pickers.framework import Admission, Param, register
from pickers.types import SchedulingError


@register
class SaturationAdmission(Admission):
    TYPE = "saturation"
    PARAMS = {
        "queue_threshold": Param(float, 5.0, min=1e-9),
        "kv_threshold": Param(float, 0.8, min=1e-9, max=1.0),
        "objectives": Param(dict, {}, doc="objective name -> priority (negative = sheddable)"),
        "stale_counts_as_saturated": Param(bool, False),
    }
    queue_threshold: float
    kv_threshold: float
    objectives: dict[str, int]
    stale_counts_as_saturated: bool

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.stale_endpoints = 0  # ready pods whose (stale) metrics the last check ignored
        for k, v in self.objectives.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"objectives.{k}: priority must be an integer, got {v!r}")

    def saturation(self, now: float) -> tuple[float, int]:
        dl = self.dl
        slots = dl.endpoints.active_slots()
        slots = slots[dl.endpoints.can_decode[slots] & dl.health.healthy[slots]]
        if slots.size == 0:
            return 0.0, 0
        m = dl.metrics
        # requests held by flow control wait for these pods too: spread over them
        waiting = m.waiting[slots] + dl.held_requests / slots.size
        per = np.maximum(waiting / self.queue_threshold, m.kv_usage[slots] / self.kv_threshold)
        fresh = m.fresh(slots, now)
        self.stale_endpoints = int(slots.size - np.count_nonzero(fresh))
        if self.stale_counts_as_saturated:
            per = np.where(fresh, per, np.maximum(per, 1.0))
        elif self.stale_endpoints:
            per = per[fresh]
            if per.size == 0:
                return 0.0, 0
        return float(per.mean()), int(per.size)

    def admit(self, ctx) -> None:
        slo = ctx.state.slo  # resolved by the director (pickers/slo.py); these objectives are folded in there
        name = slo.objective
        prio = self.objectives.get(name, slo.priority) if name else slo.priority
        if prio >= 0:
            return
        sat, n = self.saturation(ctx.now)
        if sat >= 1.0:
            raise SchedulingError(
                429,
                f"the pool is saturated ({sat:.2f} >= 1.0: mean over {n} pods of max(waiting/"
                f"{self.queue_threshold:g}, kv_usage/{self.kv_threshold:g})) and objective {name!r} has "
                f"priority {prio} (sheddable). Retry later, or send it under an objective with priority >= 0.",
                "pool_saturated", headers=(("retry-after", "1"),),
            )
