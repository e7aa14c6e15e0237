"""Data-parallel attention with expert-parallel experts (wide EP): one engine group, ``dp`` schedulers.

A pod (or group of pods) serving an MoE model with ``Deployment(tp, ep)`` and ``ep > tp`` runs
``dp = ep / tp`` data-parallel ranks. Each rank is ``tp`` GPUs with its own scheduler, batch and KV cache; it
holds every dense (attention, shared-expert, embedding) weight and ``1/dp`` of the routed experts. The ranks
step together: every MoE layer is an all-to-all among all of them (vLLM runs dummy batches on idle ranks
and pads every rank to the largest batch), so one step of the group lasts as long as its slowest rank:

    rank_r   = roofline of rank r's own tokens on a rank's GPUs, its weights (dense + 1/dp of the experts,
               read in proportion to the distinct experts the step touches) and its KV reads
    a2a_r    = rank r's tokens x (dispatch + combine of hidden states to k experts, (ep-1)/ep remote) over
               the scale-up link within a node, the scale-out NIC beyond it
    step     = max_r (rank_r + a2a_r)                                        the straggler waits for no one

``rank`` is a ``CostModel`` of one rank (the shared roofline, evaluated for a rank's resources and weights, its
all-to-all in the roofline's per-token communication term), so a rank's prefill and decode times, KV capacity
and transfer times are the one cost model's, and the picker's vectorised evaluator (pickers.costs) prices a
rank endpoint with the same roofline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache

from engine.costmodel.profiles import (
    AcceleratorProfile,
    Efficiency,
    ModelProfile,
    resolve_accelerator,
    resolve_model,
)
from engine.costmodel.roofline import CostModel, Deployment, default_deployment

# As roofline.py: MoE dispatch in FP8 (DeepEP), 8 GPUs per scale-up domain, 400 Gb/s NICs beyond it.
_EP_ACT_BYTES = 1.0
_SCALE_UP_DOMAIN = 8
_SCALE_OUT_BYTES_PER_S = 45e9

RankWork = tuple[float, float, float]  # (new tokens, attention pairs, KV tokens read) of one rank's step


def data_parallel_size(deployment: Deployment) -> int:
    """Attention ranks of a deployment: ep / tp with expert parallelism, else 1."""
    return max(1, deployment.ep // deployment.tp) if deployment.ep > 1 else 1


class DataParallelCost:
    """Step times of a DP-attention + EP-experts group; ``rank`` is the cost model of one rank."""

    __slots__ = ("model", "accelerator", "deployment", "efficiency", "dp", "rank", "a2a_s_per_token")

    def __init__(
        self,
        model: ModelProfile | str,
        accelerator: AcceleratorProfile | str,
        deployment: Deployment | None = None,
        efficiency: Efficiency | None = None,
        dp: int | None = None,
    ) -> None:
        m = resolve_model(model) if isinstance(model, str) else model
        a = resolve_accelerator(accelerator) if isinstance(accelerator, str) else accelerator
        d = deployment or default_deployment(m, a)
        self.model, self.accelerator, self.deployment = m, a, d
        self.efficiency = e = efficiency or Efficiency()
        self.dp = dp if dp is not None else data_parallel_size(d)
        if self.dp < 1:
            raise ValueError("dp must be at least 1")
        if self.dp == 1:
            self.rank = CostModel(m, a, d, e)
            self.a2a_s_per_token = 0.0
            return
        experts = m.expert_params / self.dp
        rank_model = dataclasses.replace(
            m, total_params=m.total_params - m.expert_params + experts, expert_params=experts)
        rank = CostModel(rank_model, a, Deployment(tp=d.tp), e)
        ep = max(d.ep, self.dp * d.tp)
        if m.is_moe:
            raw = a.scale_up_bytes_per_s if ep <= _SCALE_UP_DOMAIN else _SCALE_OUT_BYTES_PER_S
            per_layer = 2 * m.experts_per_token * (ep - 1) / ep * m.hidden * _EP_ACT_BYTES
            self.a2a_s_per_token = m.layers * per_layer / (raw * e.comm)
        else:
            self.a2a_s_per_token = 0.0
        # The all-to-all is per token like the tensor-parallel all-reduce: one more term of the rank's roofline,
        # so the scalar and the vectorised evaluators (pickers.costs) charge it alike.
        rank.roofline = dataclasses.replace(
            rank.roofline, comm_s_per_token=rank.roofline.comm_s_per_token + self.a2a_s_per_token)
        self.rank = rank

    def rank_step_time(self, new_tokens: float, attn_pairs: float, kv_read_tokens: float) -> float:
        """One rank's part of a step: its roofline, all-to-all included (0 for an empty rank)."""
        return self.rank.step_time(new_tokens, attn_pairs, kv_read_tokens)

    def step_time(self, ranks: Sequence[RankWork]) -> float:
        """Seconds for one step of the group: the slowest rank's (the others wait for it)."""
        return max((self.rank_step_time(*w) for w in ranks), default=0.0)

    def describe(self) -> str:
        r = self.rank
        return (f"{self.model.name} on {self.dp} ranks x {self.deployment.tp} {self.accelerator.name}: per rank KV "
                f"{r.kv_capacity_tokens:,} tokens, decode step b=32 ctx=2k "
                f"{self.rank_step_time(32, 32 * 2048, 32 * 2048) * 1e3:.1f} ms")


@lru_cache(maxsize=256)
def rank_cost_model(model_profile: str, accelerator: str, dp: int) -> CostModel:
    """The cost model of one rank of a ``dp``-rank DP-attention + EP-experts pod (tp 1), for the picker."""
    return DataParallelCost(model_profile, accelerator, Deployment(tp=1, ep=dp), dp=dp).rank


__all__ = ["DataParallelCost", "RankWork", "data_parallel_size", "rank_cost_model"]
