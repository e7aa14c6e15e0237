"""The types that cross the boundary between the ext_proc server and the scheduling framework.

extproc turns an HTTP request into an ``InferenceRequest``, asks a ``Scheduler`` for a ``Decision`` and
reports what it sees on the response path through the scheduler's hooks. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

    from pickers.state import RequestState

Api = Literal["completions", "chat", "responses", "other"]


class Role(str, enum.Enum):
    """What a pod may do in a disaggregated pool (llm-d's ``llm-d.ai/role`` label values)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_decode(self) -> bool:
        return self is not Role.PREFILL

    def can_prefill(self) -> bool:
        return self is not Role.DECODE


@dataclass(slots=True)
class Endpoint:
    """One engine instance the picker can route to: a pod, or one data-parallel rank of a pod.

    A pod running N data-parallel ranks (vLLM ``--data-parallel-size N``: N schedulers, queues and KV caches
    behind one port) is N endpoints with the same ``address`` and ``dp_rank`` 0..N-1. Their ``id``
    (``ip:port#rank``) keys every per-endpoint signal and is what a Decision names; the gateway still gets
    ``address`` and the rank goes to the pod in ``X-data-parallel-rank``. ``dp_engine`` is vLLM's engine
    index of that rank (the ``engine`` label of its metrics and the rank in its KV event batches): the same
    as ``dp_rank`` except on the non-first nodes of a multi-node group (start rank + local rank).
    """

    address: str  # "ip:port", the value that goes into x-gateway-destination-endpoint
    role: Role = Role.BOTH
    model: str = ""
    accelerator: str = "H100"
    model_profile: str = "llama-3.1-8b"  # cost-model profile for this pod's model
    labels: dict[str, str] = field(default_factory=dict)
    metrics_url: str | None = None  # default: http://{address}/metrics
    kv_events: str | None = None  # ZMQ endpoint of the pod's (or this rank's) KV event publisher
    block_size: int = 16
    max_num_batched_tokens: int | None = None  # the engine's step token budget; None: its role's preset
    max_num_seqs: int | None = None  # the engine's sequence slots (vLLM --max-num-seqs); None: its role's preset
    dp_rank: int | None = None  # the data-parallel rank this endpoint targets (X-data-parallel-rank)
    dp_engine: int | None = None  # vLLM's engine index of that rank; None: dp_rank
    dp_size: int | None = None  # ranks of its pod (prices a rank with a rank's share of the pod's GPUs)

    def __post_init__(self) -> None:
        if isinstance(self.role, str):
            self.role = Role(self.role)
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint address must be ip:port, got {self.address!r}")
        if self.dp_rank is not None and self.dp_rank < 0 or self.dp_engine is not None and self.dp_engine < 0:
            raise ValueError(f"dp_rank and dp_engine must be >= 0, got {self.dp_rank}, {self.dp_engine}")
        if self.dp_engine is not None and self.dp_rank is None:
            raise ValueError("dp_engine needs a dp_rank")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    @property
    def id(self) -> str:
        """The endpoint's key: ``ip:port``, or ``ip:port#rank`` for one data-parallel rank of a pod."""
        return self.address if self.dp_rank is None else f"{self.address}#{self.dp_rank}"

    @property
    def engine_label(self) -> str | None:
        """The ``engine`` label of this rank's metric series (None: a pod, all its series summed)."""
        if self.dp_rank is None:
            return None
        return str(self.dp_engine if self.dp_engine is not None else self.dp_rank)

    @property
    def scrape_url(self) -> str:
        return self.metrics_url or f"http://{self.address}/metrics"


@dataclass(slots=True)
class InferenceRequest:
    """An OpenAI-style request as the picker sees it: parsed once, never re-read from the body."""

    request_id: str
    model: str
    api: Api = "completions"
    prompt: str | None = None  # completions / responses: the prompt text
    # completions given as token ids (a list off the wire; an int array from in-process callers)
    prompt_token_ids: list[int] | np.ndarray | None = None
    messages: list[dict[str, Any]] | None = None  # chat: the messages as sent
    stream: bool = False
    max_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased, only those that matter
    subset: list[str] | None = None  # gateway subset hint: pick only among these addresses
    body_size: int = 0
    arrival: float = 0.0  # clock time the request reached the picker
    # the longest the gateway waits for the routing answer (an ext_authz call's deadline): flow control decides
    # a held request before then (pickers/flowcontrol.py); None: its own max_wait_s
    hold_limit_s: float | None = None

    @property
    def text(self) -> str:
        """The prompt as one string, for byte-level (approximate) matching and rough token counts."""
        if self.prompt is not None:
            return self.prompt
        if self.messages:
            from engine.tokens.tokenizer import message_text

            return "".join(
                f"{m.get('role', '')}:{message_text(m.get('content'))}\n" for m in self.messages
            )
        return ""


@dataclass(slots=True)
class Decision:
    """Where a request goes: an ordered decode fallback list and, maybe, a prefill pod.

    ``state`` is the request's typed state (pickers/state.py), which the response hooks read.
    ``explanation`` maps each considered address to its per-scorer scores and the total, so every
    decision can be explained in a log line or a response header.
    """

    state: RequestState
    endpoints: list[str]  # decode destinations, best first; never empty
    prefill: str | None = None
    profile: str = "default"
    explanation: dict[str, dict[str, float]] = field(default_factory=dict)
    decided_at: float = 0.0

    @property
    def request(self) -> InferenceRequest:
        return self.state.request

    @property
    def primary(self) -> str:
        return self.endpoints[0]


class SchedulingError(Exception):
    """A request the picker will not route. extproc answers it with an OpenAI-format error body."""

    def __init__(self, status: int, message: str, code: str, err_type: str | None = None, *,
                 param: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param  # the offending input (OpenAI error body's ``param``), e.g. a header name
        self.headers = headers  # extra response headers, e.g. ("retry-after", "1") on a 429
        self.err_type = err_type or {
            400: "invalid_request_error",
            413: "invalid_request_error",
            404: "invalid_request_error",
            429: "rate_limit_exceeded",
            503: "service_unavailable",
        }.get(status, "server_error")


@dataclass(slots=True)
class Usage:
    """What the response path saw of a finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Scheduler(Protocol):
    """What extproc needs from the picker: pickers.director.Director. Nothing here blocks the event loop."""

    async def start(self) -> None:
        """Start background work (metrics scrapes, KV-event subscriptions, discovery)."""
        ...

    async def stop(self) -> None:
        """Stop every background task; idempotent."""
        ...

    def ready(self) -> bool:
        """True while the picker can route (readiness of the gRPC health service)."""
        ...

    async def route(self, request: InferenceRequest) -> Decision:
        """Pick destinations, or raise ``SchedulingError`` (400/429/503)."""
        ...

    def on_served(self, decision: Decision, served: str) -> None:
        """The gateway reports which endpoint of the fallback list actually took the request."""
        ...

    def on_first_token(self, decision: Decision, at: float) -> None: ...

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None: ...

    def on_failed(self, decision: Decision, reason: str, at: float) -> None: ...
