"""The shared cost model (engine.costmodel) in the form the scorers need: per-pod coefficients in arrays.

Calling ``CostModel.prefill_time`` for 64 pods costs ~35 µs per decision; instead each pod's model x
accelerator is reduced once to a few coefficients (derived from ``CostModel.step_time``, so the roofline
stays the single source) and the estimate runs as vector arithmetic:

    tau_tok   seconds of compute per new token in a compute-bound step
    tau_pair  seconds per attention query-key pair
    d_kv      seconds per context token of KV a decode step reads
    overhead  fixed seconds per engine step
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from engine.costmodel import CostModel


@lru_cache(maxsize=64)
def coefficients(model_profile: str, accelerator: str) -> tuple[float, float, float, float]:
    cm = CostModel(model_profile, accelerator)
    big = 8192
    t1 = cm.step_time(big, 0.0, 0.0)
    t2 = cm.step_time(2 * big, 0.0, 0.0)
    tau_tok = max((t2 - t1) / big, 1e-12)
    pairs = 1e9
    tau_pair = max((cm.step_time(big, pairs, 0.0) - t1) / pairs, 0.0)
    b, ctx = 256, 4096
    d_kv = max((cm.decode_step_time(b, b * ctx) - cm.decode_step_time(b, 0)) / (b * ctx), 0.0)
    return tau_tok, tau_pair, d_kv, cm.efficiency.step_overhead_s


class CostTable:
    """Per endpoint slot: the coefficients above."""

    def __init__(self, max_endpoints: int = 1024) -> None:
        n = max_endpoints
        self.tau_tok = np.full(n, 1e-5)
        self.tau_pair = np.zeros(n)
        self.d_kv = np.zeros(n)
        self.overhead = np.full(n, 1e-3)

    def set(self, slot: int, model_profile: str, accelerator: str) -> None:
        self.tau_tok[slot], self.tau_pair[slot], self.d_kv[slot], self.overhead[slot] = coefficients(
            model_profile, accelerator)


def estimate_ttft(
    costs: CostTable, cands: np.ndarray, prompt: float, cached: np.ndarray, queued: np.ndarray,
    running: np.ndarray, budget: float, decode_ctx: float,
) -> np.ndarray:
    """Expected seconds to first token of a ``prompt``-token request on each candidate (see score_ttft)."""
    uncached = np.maximum(prompt - cached, 1.0)
    work = queued + uncached
    r = np.minimum(running, 0.9 * budget)
    steps = np.ceil(work / (budget - r))
    tau = costs.tau_tok[cands]
    per_step = costs.overhead[cands] + running * tau + running * decode_ctx * costs.d_kv[cands]
    compute = work * tau + (uncached * cached + 0.5 * uncached * uncached) * costs.tau_pair[cands]
    return steps * per_step + compute
