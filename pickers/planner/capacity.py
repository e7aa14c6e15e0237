"""How much traffic one pod of a kind sustains within latency targets, from the one cost model.

A pod serves requests of the workload's length distribution (a bounded sample that keeps its tail, not only
its mean) at rate lambda:

- prefill: request i needs P_i = the cost model's chunked prefill time of its uncached tokens
  (``max_num_batched_tokens`` per step, attention over the cached prefix counted); the pod spends
  rho_p = lambda E[P] of its time prefilling;
- decode: b = lambda x E[output] x TPOT requests decode at once, and a decode step of b requests over their
  context takes s(b) (cost model); decode steps get the time prefill leaves, so TPOT = s(b) / (1 - rho_p)
  (a fixed point in b), and b x context must fit the KV capacity;
- TTFT at the attainment quantile q: the q-quantile of P plus the M/G/1 waiting time for the prefill server
  at that quantile (mean lambda E[P^2] / (2 (1 - rho_p)), tail P(W > t) = rho_p exp(-t rho_p / E[W])).

The capacity is the largest lambda with TTFT_q <= the TTFT target and TPOT <= the TPOT target (0 when even one
request alone misses them: the kind cannot serve this workload's tail within the SLO).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from engine.costmodel import CostModel, Deployment


@dataclass(frozen=True, slots=True)
class PodKind:
    """One kind of pod: model x accelerator x parallelism (tp; GPUs per pod follow from it)."""

    accelerator: str
    model: str = "llama-3.1-8b"
    tp: int | None = None

    def cost(self) -> CostModel:
        return _cost(self.model, self.accelerator.upper(), self.tp)

    @property
    def gpus(self) -> int:
        return self.cost().deployment.gpus


@lru_cache(maxsize=64)
def _cost(model: str, accelerator: str, tp: int | None) -> CostModel:
    return CostModel(model, accelerator, Deployment(tp=tp) if tp else None)


@dataclass(frozen=True, slots=True)
class LoadShape:
    """A workload's lengths: a sample of prompt lengths (quantiles, so the tail is kept), the mean output
    length and the prefix-cache hit rate (share of prompt tokens that need no prefill)."""

    inputs: tuple[int, ...]
    output_mean: float
    hit_rate: float = 0.0

    @classmethod
    def from_lengths(cls, inputs: Sequence[int], outputs: Sequence[float], hit_rate: float = 0.0,
                     sample: int = 128) -> LoadShape:
        if len(inputs) == 0:
            raise ValueError("a load shape needs at least one prompt length")
        arr = np.sort(np.asarray(inputs, dtype=np.float64))
        q = np.quantile(arr, (np.arange(sample) + 0.5) / sample) if len(arr) > sample else arr
        out = float(np.mean(outputs)) if len(outputs) else 1.0
        return cls(tuple(int(round(x)) for x in q), max(1.0, out), min(max(hit_rate, 0.0), 0.99))


def _prefill_times(cost: CostModel, shape: LoadShape, chunk: int) -> np.ndarray:
    out = np.empty(len(shape.inputs))
    for i, n in enumerate(shape.inputs):
        cached = int(n * shape.hit_rate)
        todo = max(1, n - cached)
        t = 0.0
        done = 0
        while done < todo:
            c = min(chunk, todo - done)
            t += cost.prefill_time(c, cached + done)
            done += c
        out[i] = t
    return out


@dataclass(frozen=True, slots=True)
class PodEstimate:
    """The model's prediction for one pod at one rate."""

    rate: float
    ttft_q: float
    tpot: float
    prefill_util: float
    decode_batch: float
    feasible: bool


def _decode_batch(cost: CostModel, shape: LoadShape, rate: float, rho: float) -> tuple[float, float]:
    """(TPOT, decode batch b) at ``rate``: the fixed point b = rate x E[output] x TPOT with TPOT = s(b) /
    (1 - rho), s(b) the cost model's decode step of b requests over their mean context (prompt + half the
    output); ``rho`` is the share of the pod's time prefill takes (0 on a decode-only pod)."""
    ctx = _context(shape)
    tpot = cost.decode_step_time(1, int(ctx)) / (1.0 - rho)
    b = 1.0
    for _ in range(30):
        b = max(1.0, rate * shape.output_mean * tpot)
        tpot = cost.decode_step_time(int(math.ceil(b)), int(b * ctx)) / (1.0 - rho)
    return tpot, b


def _context(shape: LoadShape) -> float:
    return float(np.mean(shape.inputs)) + shape.output_mean / 2.0


def _wait_quantile(rate: float, p: np.ndarray, goal: float) -> float:
    """The M/G/1 waiting time of a prefill server with service times ``p`` at ``rate``, at quantile ``goal``
    (mean lambda E[P^2] / (2 (1 - rho)), tail P(W > t) = rho exp(-t rho / E[W])); rho < 1 assumed."""
    rho = rate * float(p.mean())
    mean_wait = rate * float((p * p).mean()) / (2.0 * (1.0 - rho)) if rate > 0 else 0.0
    tail = 1.0 - goal
    return (mean_wait / rho) * math.log(rho / tail) if rho > tail and mean_wait > 0 else 0.0


def estimate(kind: PodKind, shape: LoadShape, rate: float, goal: float = 0.95,
             max_num_batched_tokens: int = 8192, prefill: np.ndarray | None = None) -> PodEstimate:
    cost = kind.cost()
    p = prefill if prefill is not None else _prefill_times(cost, shape, max_num_batched_tokens)
    pq = float(np.quantile(p, goal))
    rho = rate * float(p.mean())
    if rho >= 0.98:
        return PodEstimate(rate, math.inf, math.inf, rho, math.inf, False)
    tpot, b = _decode_batch(cost, shape, rate, rho)
    fits = b * _context(shape) <= 0.9 * cost.kv_capacity_tokens
    return PodEstimate(rate, pq + _wait_quantile(rate, p, goal), tpot, rho, b, fits)


def pod_capacity(kind: PodKind, shape: LoadShape, ttft_s: float, tpot_s: float, goal: float = 0.95,
                 max_num_batched_tokens: int = 8192) -> float:
    """Requests/s one pod of ``kind`` serves with TTFT_goal <= ``ttft_s`` and TPOT <= ``tpot_s``."""
    p = _prefill_times(kind.cost(), shape, max_num_batched_tokens)

    def ok(rate: float) -> bool:
        e = estimate(kind, shape, rate, goal, max_num_batched_tokens, p)
        return e.feasible and e.ttft_q <= ttft_s and e.tpot <= tpot_s

    if not ok(1e-9):
        return 0.0
    lo, hi = 0.0, 0.98 / float(p.mean())
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def pods_needed(rate: float, kind: PodKind, shape: LoadShape, ttft_s: float, tpot_s: float, goal: float = 0.95,
                utilization: float = 1.0) -> int | None:
    """Pods of ``kind`` for ``rate`` requests/s (at most ``utilization`` of each pod's capacity); None when a
    pod of this kind cannot meet the targets at all."""
    cap = pod_capacity(kind, shape, ttft_s, tpot_s, goal)
    if cap <= 0:
        return None
    return max(1, math.ceil(rate / (cap * utilization) - 1e-9))


def prefill_capacity(kind: PodKind, shape: LoadShape, ttft_s: float, goal: float = 0.95,
                     decode: PodKind | None = None, first_step_s: float = 0.0, link: str = "rdma-400g",
                     max_num_batched_tokens: int = 8192) -> float:
    """Requests/s one prefill-only pod of a P/D fleet serves with TTFT at ``goal`` <= ``ttft_s``.

    The pod is an M/G/1 prefill server (no decodes share its steps): request i's TTFT is its wait plus
    P_i (chunked prefill on ``kind``) plus X_i, the KV pull to a pod of ``decode`` (the decode pod charges
    it, ``CostModel.transfer_time`` over the decode pod's NICs, as in the simulator), plus the decode pod's
    first step (``first_step_s``; the search passes ``decode_tpot`` at the decode pool's load). TTFT_q = the
    q-quantile of P + X plus the q-quantile of the wait. Prefill and decode kinds may differ: the KV layout is
    the model's, the same on both. 0 when one request alone misses the target."""
    cost = kind.cost()
    p = _prefill_times(cost, shape, max_num_batched_tokens)
    dcost = (decode or kind).cost()
    x = np.array([dcost.transfer_time(max(1, n - int(n * shape.hit_rate)), link) for n in shape.inputs])
    resp_q = float(np.quantile(p + x, goal)) + first_step_s

    def ok(rate: float) -> bool:
        return rate * float(p.mean()) < 0.98 and resp_q + _wait_quantile(rate, p, goal) <= ttft_s

    return _largest_rate(ok, 0.98 / float(p.mean()))


def decode_capacity(kind: PodKind, shape: LoadShape, tpot_s: float, max_num_seqs: int = 256) -> float:
    """Requests/s one decode-only pod of a P/D fleet serves with TPOT <= ``tpot_s``: the decode fixed point
    with no prefill share (rho = 0), the batch within 90 % of the KV capacity and within ``max_num_seqs`` (the
    engine admits no more; a decode pod's batch reaches it where KV is plentiful). 0 when one request alone
    misses the target."""
    cost = kind.cost()
    ctx = _context(shape)

    def ok(rate: float) -> bool:
        tpot, b = _decode_batch(cost, shape, rate, 0.0)
        return tpot <= tpot_s and b <= max_num_seqs and b * ctx <= 0.9 * cost.kv_capacity_tokens

    hi = max_num_seqs / (shape.output_mean * cost.decode_step_time(1, int(ctx)))  # b >= max_num_seqs there
    return _largest_rate(ok, hi)


def decode_tpot(kind: PodKind, shape: LoadShape, rate: float) -> float:
    """Seconds per decode step of a decode-only pod of ``kind`` at ``rate`` requests/s (the fixed point)."""
    return _decode_batch(kind.cost(), shape, rate, 0.0)[0]


def _largest_rate(ok: Callable[[float], bool], hi: float) -> float:
    """The largest rate in (0, hi) where ``ok`` holds (monotone: it holds below some rate), by bisection; 0
    when it fails at a vanishing rate."""
    if not ok(1e-9):
        return 0.0
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def count_for(rate: float, capacity: float, utilization: float = 1.0) -> int | None:
    """Pods of ``capacity`` requests/s each for ``rate`` at ``utilization``; None when capacity is 0."""
    if capacity <= 0:
        return None
    return max(1, math.ceil(rate / (capacity * utilization) - 1e-9))


__all__ = ["LoadShape", "PodEstimate", "PodKind", "count_for", "decode_capacity", "decode_tpot", "estimate",
           "pod_capacity", "pods_needed", "prefill_capacity"]
