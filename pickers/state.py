"""The typed state of one request on its way through the picker.

The director creates one ``RequestState`` per request, the plugins of the scheduling cycle fill it (each
derived value computed once: token ids, block hashes per block size, prefix hits per mode, the latency
prediction per endpoint), and it travels on the ``Decision`` to the response hooks, which read what the
decision knew (the pods it chose, the blocks it expects them to announce) without recomputing anything.

Invariants:
- Arrays indexed "per slot" have one entry per endpoint-table slot (``EndpointTable.slot_count`` when they
  were computed); a slot outside an array's length holds nothing (zero hits).
- Nothing here is shared between requests; the whole state is dropped when the request ends, so its size
  is bounded by the prompt (tokens and hashes) plus a few arrays of the fleet's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from pickers.types import InferenceRequest

PrefixMode = Literal["approximate", "precise", "auto"]
PREFIX_MODES: tuple[PrefixMode, ...] = ("approximate", "precise", "auto")


@dataclass(slots=True)
class Prediction:
    """Expected latencies of this request on every endpoint slot, from the one cost model.

    ``ttft_s``: time to first token if routed there now (prefill queued ahead, this prompt's uncached part
    in chunks, the running decodes sharing every step). ``prefill_s``: this prompt's uncached part alone on
    an idle pod, above the cost of an empty step: how long every running decode there waits because of it.
    ``tpot_s``: the decode step time once it joins the running batch. The rest are the inputs, kept for
    explanations and for plugins that weigh them differently.
    """

    mode: PrefixMode
    ttft_s: np.ndarray
    wait_s: np.ndarray  # the part of ttft_s spent on the prefill queued ahead
    prefill_s: np.ndarray
    tpot_s: np.ndarray
    uncached: np.ndarray  # prompt tokens to compute
    queued: np.ndarray  # prompt tokens queued ahead
    running: np.ndarray  # decodes sharing each step
    # the cost model's own numbers before the online correction (pickers/correction.py), which learns from
    # them; None when no correction is applied
    ttft_raw_s: np.ndarray | None = None
    tpot_raw_s: np.ndarray | None = None


@dataclass(slots=True)
class ProfileResult:
    """One profile's run: the ranking (its fallback list) and every candidate's scores."""

    profile: str
    ranked: np.ndarray  # endpoint slots, best first
    cands: np.ndarray  # every candidate that passed the filters
    totals: np.ndarray  # weighted sum per candidate
    scores: dict[str, np.ndarray]  # scorer label -> per candidate


# Why a prefill leg was or was not run (numbers, so the explanation stays a mapping of floats).
PDReason = Literal["leg", "no-prefill-pods", "below-threshold", "mostly-cached-on-decode", "prefill-saturated",
                   "split-faster", "local-faster", "protect-tpot", "always", "never"]
PD_REASON_CODES: dict[PDReason, int] = {
    "leg": 0, "no-prefill-pods": 1, "below-threshold": 2, "mostly-cached-on-decode": 3, "prefill-saturated": 4,
    "split-faster": 5, "local-faster": 6, "protect-tpot": 7, "always": 8, "never": 9,
}


@dataclass(slots=True)
class PDVerdict:
    """The prefill/decode decision for one request and the numbers behind it (pickers/plugins/pd_decider.py)."""

    leg: bool
    reason: PDReason
    prompt: float
    uncached: float
    threshold: float = 0.0
    saved_s: float = 0.0
    prefill_wait_s: float = 0.0
    decode_room: bool = True
    # the SLO-aware decider's numbers (pickers/plugins/pd_decider.py); -1 where it did not compute them
    local_ttft_s: float = -1.0  # predicted TTFT with the prompt prefilled on the decode pod, its queue included
    split_ttft_s: float = -1.0  # predicted TTFT through the best prefill pod: its queue, prefill, KV transfer,
    #                             the hop and the decode pod's first step
    local_tpot_s: float = -1.0  # the decode pod's running requests' TPOT if the prompt is prefilled there

    def explain(self) -> dict[str, float]:
        extra = {} if self.local_ttft_s < 0 else {
            "local-ttft-ms": round(self.local_ttft_s * 1e3, 3), "split-ttft-ms": round(self.split_ttft_s * 1e3, 3),
            "local-tpot-ms": round(self.local_tpot_s * 1e3, 3)}
        return {
            "leg": 1.0 if self.leg else 0.0, "reason": float(PD_REASON_CODES[self.reason]), "prompt": self.prompt,
            "uncached": self.uncached,
            "ratio": round(self.uncached / self.prompt, 4) if self.prompt else 0.0,
            "threshold": float(self.threshold), "saved-ms": round(self.saved_s * 1e3, 3),
            "prefill-wait-ms": round(self.prefill_wait_s * 1e3, 3),
            "decode-room": 1.0 if self.decode_room else 0.0, **extra,
        }


@dataclass(frozen=True, slots=True)
class SLOTargets:
    """What this request must meet, resolved once at arrival from its headers, its objective and the
    pool's defaults (None: no target of that kind). ``priority`` orders admission: higher is admitted
    first; below zero is sheddable (InferenceObjective semantics)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    priority: int = 0
    objective: str | None = None

    @property
    def any(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


NO_TARGETS = SLOTargets()


@dataclass(slots=True)
class Expected:
    """What the decision predicted for the pods it chose (corrected and raw), kept until the response
    shows what happened: the online correction learns from the pair, the error histograms record it.
    ``prefill_slot`` ran the prompt (the decode pod without a prefill leg)."""

    prefill_slot: int
    decode_slot: int
    ttft_s: float
    tpot_s: float
    ttft_raw_s: float
    tpot_raw_s: float
    first_token_at: float = -1.0


@dataclass(slots=True)
class KVExpectation:
    """Pods that will announce new blocks for this prompt in KV events: judged at first token (or end)."""

    routed_at: float
    slots: list[int]


@dataclass(slots=True)
class RequestState:
    """Everything the picker knows about one request, from arrival to the end of its response."""

    request: InferenceRequest
    key: str  # keys in-flight load and pending blocks; unique per request (the gateway's request id)
    arrival: float
    slo: SLOTargets = NO_TARGETS
    tokens: np.ndarray | None = None  # the engine's token ids of the prompt, when a plugin needs them
    block_hashes: dict[int, np.ndarray] = field(default_factory=dict)  # block size -> chained hashes (uint64)
    hits: dict[PrefixMode, np.ndarray] = field(default_factory=dict)  # mode -> cached tokens per slot
    predictions: dict[PrefixMode, Prediction] = field(default_factory=dict)
    candidates: np.ndarray | None = None  # slots the director allowed (active, inside the subset hint)
    results: list[ProfileResult] = field(default_factory=list)  # decode profile first, then prefill
    rejected: dict[str, int] = field(default_factory=dict)  # filter label -> candidates it removed
    decode: str | None = None  # chosen decode pod (head of the fallback list)
    prefill: str | None = None  # chosen prefill pod, when a leg runs
    pd: PDVerdict | None = None
    served: str | None = None  # the pod the gateway reports as serving (may differ from ``decode``)
    kv_expect: KVExpectation | None = None
    decided_at: float = 0.0
    expected: Expected | None = None  # the chosen pods' predicted latencies (director, at record time)

    @property
    def serving(self) -> str | None:
        """The pod that holds this request's load: the one the gateway reported, else the chosen one."""
        return self.served or self.decode


__all__ = [
    "Expected", "KVExpectation", "PD_REASON_CODES", "PDReason", "PDVerdict", "PREFIX_MODES", "Prediction", "PrefixMode",
    "ProfileResult", "RequestState", "NO_TARGETS", "SLOTargets",
]
