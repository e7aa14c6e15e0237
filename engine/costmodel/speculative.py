"""Speculative decoding in the one cost model: what a verify step costs and how many tokens it yields.

With ``k`` drafted tokens per request, each decode step of the target model verifies ``k + 1`` tokens per
request (the last real token and the drafts: ``k + 1`` query tokens attending to the request's context) after
``k`` sequential draft forwards. Draft i is accepted with probability ``acceptance`` if every draft before it
was, so a step yields ``1 + a + a^2 + ... + a^k`` tokens per request on average (the last accepted draft's
successor comes free from the verify pass). Then

    verify  = step_time(batch x (k+1) new tokens, (k+1) x context pairs, context read)     the roofline
    draft   = k x draft_cost x step_time(batch, context pairs, context read)               k small forwards
    TPOT    = (verify + draft) / tokens_per_step

``draft_cost`` is one draft forward as a fraction of one target forward (an MTP or EAGLE head is one layer:
~1/layers; a separate small draft model its size ratio). Decode is memory-bound on weights, so verifying
k + 1 tokens costs little more than one: that is where the speed-up comes from, and why it shrinks at
large batches, where the step turns compute-bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Speculative:
    """Speculative decoding: vLLM's ``--speculative-config`` and what the cost model needs of it."""

    method: str  # vLLM's method name: "mtp", "eagle3", "draft_model"
    num_speculative_tokens: int
    model: str | None = None  # the draft model or EAGLE head repository; None: heads inside the checkpoint
    acceptance: float = 0.7
    draft_cost: float = 0.05

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1 or not 0.0 <= self.acceptance <= 1.0 or self.draft_cost < 0:
            raise ValueError("num_speculative_tokens >= 1, acceptance in [0, 1] and draft_cost >= 0 required")

    def config(self) -> dict:
        cfg: dict[str, object] = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.model:
            cfg["model"] = self.model
        return cfg

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a request gains per verify step: 1 + a + a^2 + ... + a^k."""
        a, k = self.acceptance, self.num_speculative_tokens
        return sum(a**i for i in range(k + 1))


class _StepTime(Protocol):
    def step_time(self, new_tokens: float, attn_pairs: float, kv_read_tokens: float) -> float: ...


def draft_seconds(cost: _StepTime, spec: Speculative, batch: float, kv_tokens: float) -> float:
    """The ``k`` draft forwards of one step for ``batch`` decoding requests holding ``kv_tokens`` of context."""
    if batch <= 0:
        return 0.0
    return spec.num_speculative_tokens * spec.draft_cost * cost.step_time(batch, kv_tokens, kv_tokens)


def verify_step_seconds(cost: _StepTime, spec: Speculative, batch: float, kv_tokens: float) -> float:
    """One decode step with speculation: verify ``k + 1`` tokens per request, plus the drafts."""
    if batch <= 0:
        return 0.0
    q = spec.num_speculative_tokens + 1
    return cost.step_time(batch * q, kv_tokens * q, kv_tokens) + draft_seconds(cost, spec, batch, kv_tokens)


def tpot_seconds(cost: _StepTime, batch: float, kv_tokens: float, spec: Speculative | None = None) -> float:
    """Expected time per output token of a decode batch, with or without speculative decoding."""
    if spec is None:
        return cost.step_time(batch, kv_tokens, kv_tokens)
    return verify_step_seconds(cost, spec, batch, kv_tokens) / spec.tokens_per_step


__all__ = ["Speculative", "draft_seconds", "tpot_seconds", "verify_step_seconds"]
