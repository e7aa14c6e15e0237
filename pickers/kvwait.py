"""How long a new request waits for KV space on each pod: the part of TTFT that past the knee dominates.

vLLM admits a waiting request only when the pod has free KV blocks for it; a pod whose cache is full of
running requests frees space only as they finish decoding. Below the knee (free KV for everything queued)
the wait is 0 and the expected TTFT is the prefill estimate alone; past it, the wait is set by how fast the
pod's decodes drain, which depends on how many output tokens are left and how long their contexts are (a
decode step reads every running request's KV). Per endpoint slot p:

    cap_p   = KV capacity in tokens (``num_gpu_blocks`` x block size when /metrics gave it, else the cost
              model's, pickers.costs)
    held_p  = kv_usage_p x cap_p                         context the running requests hold (fresh metrics)
    need_p  = Q_p + U_p - (cap_p - held_p)                tokens that must be freed before this prompt fits
    b_p     = running decodes (at least 1)
    drain_p = D_p / b_p x decode_step(b_p, held_p)        time to produce the D_p decode tokens in flight
    wait_p  = clip(need_p / held_p, 0, 1) x drain_p       free need_p of the held_p tokens at the drain rate

D_p is the decode work the picker sent to p and has not seen finish (``inflight.decode_tokens``: each
request's max_tokens, or the scheduler's default when the client gave none); decode_step is the one
roofline (engine.costmodel.vector). The drain is linear (requests end at a steady rate and free their KV as
they do), exact for a steady state and the right order in a burst, which is what ranking pods needs. When
more is queued than the cache holds (need >= held) the whole drain is ahead of the request. Stale metrics
give 0 (no evidence of a full cache).

Why it matters (virtual time, 4 L40S pods, the shared Mooncake trace past the knee): without it the TTFT of
a pod whose cache is full of long-context requests was underestimated 1.8x (median actual/predicted TTFT),
against 1.1-1.25x with it, and the picker kept sending such pods more work than they could drain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from engine.costmodel.vector import decode_step_seconds

if TYPE_CHECKING:
    from pickers.datalayer import DataLayer


def kv_wait_seconds(dl: DataLayer, slots: np.ndarray, now: float, queued: np.ndarray, uncached: np.ndarray,
                    running: np.ndarray) -> np.ndarray:
    """Expected seconds a new request of ``uncached`` tokens waits for KV space on each of ``slots``."""
    fresh = dl.fresh(slots, now)
    cap, held, b = kv_held(dl, slots, fresh, running)
    step = decode_step_seconds(dl.costs.rooflines(slots), b, held)
    return kv_wait_from_step(dl, slots, fresh, queued, uncached, cap, held, b, step)


def kv_held(dl: DataLayer, slots: np.ndarray, fresh: np.ndarray,
            running: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request-independent part of the wait: per slot (cap_p, held_p, b_p) of the module docstring.
    The drain's decode step is ``decode_step_seconds(rooflines, b, held)``; the predictor evaluates it in
    one call with its other steps and passes it to ``kv_wait_from_step``."""
    blocks = dl.metrics.num_gpu_blocks[slots] * dl.endpoints.block_size[slots]
    cap = np.where(blocks > 0, blocks, dl.costs.kv_capacity[slots])
    held = np.where(fresh, dl.metrics.kv_usage[slots], 0.0) * cap
    return cap, held, np.maximum(running, 1.0)


def kv_wait_from_step(dl: DataLayer, slots: np.ndarray, fresh: np.ndarray, queued: np.ndarray,
                      uncached: np.ndarray, cap: np.ndarray, held: np.ndarray, b: np.ndarray,
                      step: np.ndarray) -> np.ndarray:
    """``kv_wait_seconds`` from ``kv_held``'s terms and the drain's decode step (bit for bit the same)."""
    need = queued + uncached - (cap - held)
    drain = dl.inflight.decode_tokens[slots] / b * step
    return np.where(fresh & (need > 0), np.minimum(need / np.maximum(held, 1.0), 1.0) * drain, 0.0)


__all__ = ["kv_held", "kv_wait_from_step", "kv_wait_seconds"]
