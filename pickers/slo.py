"""A request's latency targets and priority, resolved once at arrival (into ``RequestState.slo``).

Sources, first match wins per field:

1. request headers: ``x-llm-d-slo-ttft-ms`` / ``x-llm-d-slo-tpot-ms`` (llm-d's names) or the older
   ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` (both accepted; sending both with different values is an error);
2. the request's objective (``x-llm-d-inference-objective``, else ``x-gateway-inference-objective``), looked up
   in ``scheduler.objectives: {NAME: {priority, ttft_ms, tpot_ms}}`` (an InferenceObjective's fields);
3. the pool's defaults, ``scheduler.slo: {ttft_ms, tpot_ms}``.

A header value that is not a plain decimal number of milliseconds inside the bounds below is a 400 (the
extproc answers it in the OpenAI error format): a bad target is never silently replaced by a default,
because the client would then believe it was admitted against its own target. An objective the config
does not name is not an error (priority 0, no targets: the Gateway API Inference Extension's rule for an
unknown objective), but its name must be a short printable token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pickers.state import NO_TARGETS, SLOTargets
from pickers.types import InferenceRequest, SchedulingError

TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
SLO_HEADERS = frozenset((*TTFT_HEADERS, *TPOT_HEADERS, *OBJECTIVE_HEADERS))

# Bounds on targets (milliseconds): a TTFT target beyond an hour or a TPOT beyond a minute per token is a
# typo (seconds sent as milliseconds the other way round is caught by the lower bound only at 0).
TTFT_MS_MAX = 3_600_000.0
TPOT_MS_MAX = 60_000.0
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000
_MAX_VALUE_CHARS = 32
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_OBJECTIVE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")


def bad_slo(message: str, param: str) -> SchedulingError:
    """A 400 for a bad SLO input; ``param`` names the header (OpenAI error body's ``param``)."""
    return SchedulingError(400, message, "invalid_slo", param=param)


@dataclass(frozen=True, slots=True)
class Objective:
    """What an objective name means: a priority (higher admitted first; below 0: sheddable) and default
    targets in seconds (None: the pool's default)."""

    priority: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(slots=True)
class SLOPolicy:
    """The pool's objectives and default targets; ``resolve`` turns a request into its ``SLOTargets``."""

    objectives: dict[str, Objective] = field(default_factory=dict)
    default_ttft_s: float | None = None
    default_tpot_s: float | None = None

    def resolve(self, request: InferenceRequest) -> SLOTargets:
        """The request's targets (raises a 400 ``SchedulingError`` for a malformed or out-of-bounds header)."""
        h = request.headers
        ttft_ms = _header_ms(h, TTFT_HEADERS, TTFT_MS_MAX)
        tpot_ms = _header_ms(h, TPOT_HEADERS, TPOT_MS_MAX)
        name = _objective_name(h)
        obj = self.objectives.get(name) if name is not None else None
        if ttft_ms is None and tpot_ms is None and name is None and self.default_ttft_s is None \
                and self.default_tpot_s is None:
            return NO_TARGETS
        ttft = ttft_ms / 1e3 if ttft_ms is not None else (
            obj.ttft_s if obj is not None and obj.ttft_s is not None else self.default_ttft_s)
        tpot = tpot_ms / 1e3 if tpot_ms is not None else (
            obj.tpot_s if obj is not None and obj.tpot_s is not None else self.default_tpot_s)
        return SLOTargets(ttft, tpot, obj.priority if obj is not None else 0, name)


def _header_ms(headers: dict[str, str], names: tuple[str, ...], upper: float) -> float | None:
    got: float | None = None
    first = ""
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.strip()
        if len(text) > _MAX_VALUE_CHARS or not _NUMBER.match(text):
            raise bad_slo(f"header {name} must be a positive number of milliseconds (digits, optionally a "
                          f"decimal point), got {raw[:_MAX_VALUE_CHARS]!r}", name)
        v = float(text)
        if not math.isfinite(v) or v <= 0.0 or v > upper:
            raise bad_slo(f"header {name} must be > 0 and <= {upper:g} ms, got {text}", name)
        if got is not None and v != got:
            raise bad_slo(f"headers {first} ({got:g}) and {name} ({v:g}) disagree: send one of them", name)
        got, first = v, first or name
    return got


def _objective_name(headers: dict[str, str]) -> str | None:
    for name in OBJECTIVE_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.strip()
        if not text:
            continue
        if not _OBJECTIVE.match(text):
            raise bad_slo(f"header {name} must be an objective name (letters, digits, '.', '_', ':', '/', '-'; "
                          f"at most 253 characters), got {raw[:64]!r}", name)
        return text
    return None


__all__ = [
    "OBJECTIVE_HEADERS",
    "SLO_HEADERS",
    "TPOT_HEADERS",
    "TTFT_HEADERS",
    "Objective",
    "SLOPolicy",
    "bad_slo",
]
