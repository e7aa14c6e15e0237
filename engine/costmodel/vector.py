"""The one cost model evaluated for many pods at once (the scorers, the predictor, admission, the planner).

Nothing here is a second approximation: every function evaluates ``roofline.step_seconds`` (the same
formula the simulator charges per step) on numpy arrays with one entry per pod, and sums steps exactly as
``CostModel.time_to_first_token`` does, in closed form instead of a loop. ``tests/costmodel`` holds the two
paths together for every model x accelerator profile.

Closed form of a chunked prefill. A prompt with ``new`` uncached tokens after ``cached`` ones is computed in
steps of ``chunk`` prefill tokens (the step budget less one token per running decode), the last one
partial. For the full chunks j = 0..N-1 both the compute term and the memory term of the roofline are
linear in j (each chunk attends to, and reads the KV of, j more chunks), so the sum of their maximum is two
arithmetic series split where the lines cross; the partial chunk is one more step.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from engine.costmodel.roofline import Roofline, step_seconds

FIELDS = tuple(f.name for f in fields(Roofline))


class RooflineTable:
    """One Roofline per endpoint slot, stored field by field as arrays (slots are reused by the caller)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # A neutral default (1 ms steps of a small dense model) for slots not set yet.
        defaults = Roofline(0.001, 2e9, 0.0, 1e14, 2e9, 0.0, 1.0, 1e5, 1e12, 0.0)
        self._cols = {name: np.full(size, float(getattr(defaults, name))) for name in FIELDS}

    def set(self, slot: int, roofline: Roofline) -> None:
        for name in FIELDS:
            self._cols[name][slot] = float(getattr(roofline, name))

    def column(self, name: str) -> np.ndarray:
        return self._cols[name]

    def gather(self, slots: np.ndarray) -> Roofline:
        """A Roofline whose fields are arrays, one entry per slot in ``slots``."""
        return Roofline(**{name: col[slots] for name, col in self._cols.items()})


def step_seconds_v(c: Roofline, new_tokens: np.ndarray, attn_pairs: np.ndarray,
                   kv_read_tokens: np.ndarray) -> np.ndarray:
    """``step_seconds`` over arrays; zero where a step has no tokens (as ``CostModel.step_time``)."""
    n = np.asarray(new_tokens, dtype=np.float64)
    t = step_seconds(c, np.maximum(n, 1e-9), attn_pairs, kv_read_tokens, np.maximum)
    return np.where(n > 0, t, 0.0)


def decode_step_seconds(c: Roofline, batch: np.ndarray, kv_tokens: np.ndarray) -> np.ndarray:
    """One decode step of ``batch`` requests holding ``kv_tokens`` of context (``CostModel.decode_step_time``)."""
    return step_seconds_v(c, batch, kv_tokens, kv_tokens)


def _series(first: np.ndarray, slope: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sum of first + slope * j for integer j in [lo, hi)."""
    n = np.maximum(hi - lo, 0.0)
    return n * first + slope * (lo + hi - 1.0) * n / 2.0


def _sum_of_max(a: np.ndarray, b: np.ndarray, m: np.ndarray, e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sum over j = 0..n-1 of max(a + b j, m + e j), element-wise, in O(1)."""
    d0, dd = a - m, b - e
    safe = np.where(dd != 0, dd, 1.0)
    cross = -d0 / safe  # compute (a + b j) wins for j >= cross if dd > 0, for j <= cross if dd < 0
    zero = np.zeros(np.shape(n))
    up_lo = np.minimum(np.maximum(np.ceil(cross), 0.0), n)
    down_hi = np.minimum(np.maximum(np.floor(cross) + 1.0, 0.0), n)
    everywhere = d0 >= 0  # dd == 0: everywhere or nowhere (the empty range [n, n))
    up, down = dd > 0, dd < 0
    lo = np.where(up, up_lo, np.where(down, zero, np.where(everywhere, zero, n)))
    hi = np.where(up, n, np.where(down, down_hi, n))
    shape = np.shape(n)
    if len(shape) == 1 and all(np.shape(x) == shape for x in (a, b, m, e)):
        # the three series in one evaluation (the same operations on each element, a third of the calls)
        k = shape[0]
        s = _series(np.concatenate((a, m, m)), np.concatenate((b, e, e)), np.concatenate((lo, zero, hi)),
                    np.concatenate((hi, lo, n)))
        return s[:k] + s[k:2 * k] + s[2 * k:]
    return _series(a, b, lo, hi) + _series(m, e, zero, lo) + _series(m, e, hi, n)


def prefill_seconds(c: Roofline, new: np.ndarray, chunk: np.ndarray, running: np.ndarray,
                    decode_pairs: np.ndarray, start: np.ndarray, grow: np.ndarray) -> np.ndarray:
    """Seconds of the steps that prefill ``new`` tokens in chunks of ``chunk`` (the last one partial), each
    step also carrying ``running`` decode tokens whose attention covers ``decode_pairs`` query-key pairs (and
    reads that much KV). Chunk j attends to, and reads the KV of, ``grow x (start + j x chunk)`` earlier
    tokens: ``grow`` 1 for a prompt after a cached prefix of ``start`` tokens, 0 for queued prompts taken
    as fresh. Exactly the steps ``CostModel.time_to_first_token`` charges one by one."""
    full, last = prefill_split(c, new, chunk, running, decode_pairs, start, grow)
    return full + step_seconds_v(c, *last)


def prefill_split(c: Roofline, new: np.ndarray, chunk: np.ndarray, running: np.ndarray,
                  decode_pairs: np.ndarray, start: np.ndarray, grow: np.ndarray
                  ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``prefill_seconds`` in two parts: the seconds of the full chunks, and the arguments of
    ``step_seconds_v`` for the partial last step (new tokens, attention pairs, KV read), so a caller can
    evaluate that step in one call together with other steps (pickers/predictor.py: one ``step_seconds_v``
    for the last steps and the decode steps of a decision). ``full + step_seconds_v(c, *last)`` is
    ``prefill_seconds`` bit for bit."""
    n = np.floor(new / chunk)
    rest = new - n * chunk
    tokens = chunk + running
    ctx0 = grow * start
    own_pairs = chunk * (chunk + 1.0) / 2.0 + decode_pairs
    a = (c.flops_per_token * tokens + c.flops_per_pair * (own_pairs + chunk * ctx0)) / c.peak_flops
    b = c.flops_per_pair * grow * chunk * chunk / c.peak_flops
    weights = c.dense_bytes + c.expert_bytes * (1.0 - c.expert_untouched ** tokens)
    m = (weights + c.kv_bytes_per_token * (ctx0 + decode_pairs + tokens)) / c.bandwidth
    e = c.kv_bytes_per_token * grow * chunk / c.bandwidth
    full = n * (c.overhead_s + c.comm_s_per_token * tokens) + _sum_of_max(a, b, m, e, n)
    ctx = ctx0 + grow * n * chunk
    return full, (np.where(rest > 0, rest + running, 0.0), rest * ctx + rest * (rest + 1.0) / 2.0 + decode_pairs,
                  ctx + decode_pairs)


def ttft_seconds(c: Roofline, prompt: float | np.ndarray, cached: np.ndarray, queued: np.ndarray,
                 running: np.ndarray, budget: np.ndarray, decode_context: float | np.ndarray) -> np.ndarray:
    """``CostModel.time_to_first_token`` for many pods: ``c`` holds one roofline per pod, every other array
    one value per pod (``prompt`` and ``decode_context`` may be scalars)."""
    wait, own = ttft_parts(c, prompt, cached, queued, running, budget, decode_context)
    return wait + own


def ttft_parts(c: Roofline, prompt: float | np.ndarray, cached: np.ndarray, queued: np.ndarray,
               running: np.ndarray, budget: np.ndarray,
               decode_context: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ttft_seconds`` in its two parts: the steps that prefill the ``queued`` tokens ahead (the wait), and
    the steps that prefill this prompt's own new tokens after its ``cached`` prefix."""
    budget = np.asarray(budget, dtype=np.float64)
    r = np.minimum(running, 0.9 * budget)
    chunk = budget - r
    d_pairs = r * decode_context
    zero = np.zeros_like(chunk)
    new = np.maximum(prompt - cached, 1.0)
    wait = prefill_seconds(c, np.asarray(queued, dtype=np.float64), chunk, r, d_pairs, zero, zero)
    own = prefill_seconds(c, new, chunk, r, d_pairs, np.asarray(cached, dtype=np.float64), zero + 1.0)
    return wait, own


__all__ = [
    "FIELDS", "RooflineTable", "decode_step_seconds", "prefill_seconds", "prefill_split", "step_seconds_v",
    "ttft_parts",
    "ttft_seconds",
]
