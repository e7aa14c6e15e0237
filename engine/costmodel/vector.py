"""The one cost model evaluated for many pods at once (the scorers, the predictor, admission, the planner).

Nothing here is a second approximation: single steps evaluate ``roofline.step_seconds`` (the same formula
the simulator charges per step) on numpy arrays with one entry per pod, and a chunked prefill sums exactly
the steps ``CostModel.time_to_first_token`` charges one by one, in closed form instead of a loop (the
roofline's compute and memory terms written per chunk, in one compiled loop over the pods: for the few pods
of a decision, numpy's per-call cost exceeded the arithmetic). ``tests/costmodel`` holds the paths together
for every model x accelerator profile.

Closed form of a chunked prefill. A prompt with ``new`` uncached tokens after ``cached`` ones is computed in
steps of ``chunk`` prefill tokens (the step budget less one token per running decode), the last one
partial. For the full chunks j = 0..N-1 both the compute term and the memory term of the roofline are
linear in j (each chunk attends to, and reads the KV of, j more chunks), so the sum of their maximum is two
arithmetic series split where the lines cross; the partial chunk is one more step.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from numba import njit

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


@njit(cache=True, nogil=True)
def _series(first, slope, lo, hi):  # type: ignore[no-untyped-def]
    """sum of first + slope * j for integer j in [lo, hi)."""
    n = max(hi - lo, 0.0)
    return n * first + slope * (lo + hi - 1.0) * n / 2.0


@njit(cache=True, nogil=True)
def _sum_of_max(a, b, m, e, n):  # type: ignore[no-untyped-def]
    """sum over j = 0..n-1 of max(a + b j, m + e j), in O(1): the lines cross at most once."""
    d0, dd = a - m, b - e
    if dd > 0:  # compute (a + b j) wins from the crossing on
        lo, hi = min(max(np.ceil(-d0 / dd), 0.0), n), n
    elif dd < 0:  # ... up to the crossing
        lo, hi = 0.0, min(max(np.floor(-d0 / dd) + 1.0, 0.0), n)
    else:  # parallel: everywhere or nowhere (the empty range [n, n))
        lo, hi = (0.0, n) if d0 >= 0 else (n, n)
    return _series(a, b, lo, hi) + _series(m, e, 0.0, lo) + _series(m, e, hi, n)


@njit(cache=True, nogil=True)
def _prefill_split(fpt, fpp, peak, dense, expert, untouched, kvb, bw, overhead, comm,  # type: ignore[no-untyped-def]
                   new, chunk, running, decode_pairs, start, grow, full, last_new, last_pairs, last_read):
    for i in range(new.size):
        ch, run, dp, g = chunk[i], running[i], decode_pairs[i], grow[i]
        n = np.floor(new[i] / ch)
        rest = new[i] - n * ch
        tokens = ch + run
        ctx0 = g * start[i]
        own_pairs = ch * (ch + 1.0) / 2.0 + dp
        a = (fpt[i] * tokens + fpp[i] * (own_pairs + ch * ctx0)) / peak[i]
        b = fpp[i] * g * ch * ch / peak[i]
        weights = dense[i] + expert[i] * (1.0 - untouched[i] ** tokens)
        m = (weights + kvb[i] * (ctx0 + dp + tokens)) / bw[i]
        e = kvb[i] * g * ch / bw[i]
        full[i] = n * (overhead[i] + comm[i] * tokens) + _sum_of_max(a, b, m, e, n)
        ctx = ctx0 + g * n * ch
        last_new[i] = rest + run if rest > 0 else 0.0
        last_pairs[i] = rest * ctx + rest * (rest + 1.0) / 2.0 + dp
        last_read[i] = ctx + dp


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
    ``prefill_seconds`` bit for bit.

    Full chunks j = 0..N-1 cost ``overhead + comm x tokens + max(a + b j, m + e j)`` each (the roofline's compute
    and memory terms, both linear in j): their sum is closed-form (``_sum_of_max``). Evaluated element by
    element in one compiled loop: for the handful of pods of a decision, ~30 numpy operations on tiny arrays
    cost far more than the arithmetic."""
    args = [np.asarray(x, dtype=np.float64) for x in (
        c.flops_per_token, c.flops_per_pair, c.peak_flops, c.dense_bytes, c.expert_bytes, c.expert_untouched,
        c.kv_bytes_per_token, c.bandwidth, c.overhead_s, c.comm_s_per_token,
        new, chunk, running, decode_pairs, start, grow)]
    shape = args[10].shape
    if len(shape) != 1 or any(x.shape != shape for x in args):  # scalars among arrays: one shape for all
        args = [np.ascontiguousarray(x, dtype=np.float64).reshape(-1) for x in np.broadcast_arrays(*args)]
    k = args[10].size
    full, last_new, last_pairs, last_read = np.empty(k), np.empty(k), np.empty(k), np.empty(k)
    _prefill_split(*args, full, last_new, last_pairs, last_read)  # type: ignore[call-arg]
    return full, (last_new, last_pairs, last_read)


def warm_up() -> None:
    """Load (or compile, the first time on a machine: ~2 s) the compiled prefill kernel now rather than in the
    first decision; the compiled code is cached on disk (numba ``cache=True``)."""
    c = RooflineTable(1).gather(np.zeros(1, dtype=np.int64))
    one, frozen = np.ones(1), np.ones(1)
    frozen.flags.writeable = False  # numba compiles read-only arrays apart: the predictor's ``grow`` is one
    prefill_split(c, one, one, one, one, one, one)
    prefill_split(c, one, one, one, one, one, frozen)


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
    "warm_up",
]
