"""The one cost model: how long an engine step takes, and how much KV a pod holds.

The simulator charges these times, the scorers turn them into expected TTFT, admission checks SLOs
with them and the planner sizes pools with them (DESIGN.md, "One cost model").

A step of a continuous-batching engine processes ``T`` tokens: the new prompt tokens of the requests
being prefilled (possibly a chunk) plus one token per decoding request. It is modelled as a roofline:

    compute  = (2 * active_params * T + attn_flops_per_pair * layers * pairs) / (gpus * peak * mfu)
    memory   = (weights_read + kv_bytes_per_token * (kv_read + T)) / (gpus * hbm_bw * mbu)
    comm     = tensor-parallel all-reduces + expert-parallel all-to-all for the step's activations
    step     = step_overhead + max(compute, memory) + comm

``pairs`` counts query-key pairs: a prefill chunk of ``n`` new tokens after ``c`` cached ones attends
to ``n*c + n*(n+1)/2`` pairs; a decoding request with ``k`` tokens of context attends to ``k``.
``weights_read`` is every dense weight once per step plus, for MoE, the share of expert weights the
step's tokens touch: a layer with E experts and top-k routing touches E * (1 - (1 - k/E)^T) distinct
experts when T tokens route independently. ``kv_read`` is the KV the step's attention reads.

This gives the two regimes that matter to routing: prefill time grows linearly with new tokens (and
quadratically with long contexts), decode step time is flat in batch size until KV reads dominate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.costmodel.profiles import (
    AcceleratorProfile,
    Efficiency,
    LinkProfile,
    ModelProfile,
    resolve_accelerator,
    resolve_link,
    resolve_model,
)

# Activations cross the wire in BF16 for tensor parallel all-reduce, FP8 for MoE dispatch (DeepEP).
_TP_ACT_BYTES = 2.0
_EP_ACT_BYTES = 1.0
_SCALE_UP_DOMAIN = 8  # GPUs per node on a fast link; beyond it collectives cross the scale-out NIC
_SCALE_OUT_BYTES_PER_S = 45e9

Number = float | np.ndarray


@dataclass(frozen=True, slots=True)
class Deployment:
    """How one engine instance (one pod, one vLLM server) spreads over GPUs."""

    tp: int = 1  # tensor parallel
    ep: int = 1  # GPUs the routed experts are spread over; attention then runs data parallel

    @property
    def gpus(self) -> int:
        return max(self.tp, self.ep)


@dataclass(frozen=True, slots=True)
class Roofline:
    """Everything an engine step's duration depends on, reduced to numbers (see ``step_seconds``).

    Each field is a float for one engine, or a numpy array with one entry per engine: ``step_seconds`` is
    written once with plain arithmetic and evaluates both, so the simulator (scalar) and the scorers
    (vectorised over candidate pods) charge exactly the same time for the same step.
    """

    overhead_s: Number  # fixed per step: scheduling, launches
    flops_per_token: Number  # 2 x active parameters
    flops_per_pair: Number  # attention FLOPs per query-key pair, all layers
    peak_flops: Number  # usable FLOP/s of the engine (GPUs x peak x MFU)
    dense_bytes: Number  # weights read once per step (all but routed experts)
    expert_bytes: Number  # routed expert weights; read in proportion to the experts a step touches
    expert_untouched: Number  # 1 - experts_per_token / num_experts (1.0 for dense models)
    kv_bytes_per_token: Number
    bandwidth: Number  # usable HBM bytes/s of the engine (GPUs x bandwidth x MBU)
    comm_s_per_token: Number  # tensor-parallel all-reduce + expert-parallel all-to-all per token


def step_seconds(c: Roofline, new_tokens: Any, attn_pairs: Any, kv_read_tokens: Any,
                 maximum: Callable[[Any, Any], Any] = max) -> Any:
    """The roofline of one step (module docstring). ``maximum`` is ``max`` for floats, ``np.maximum`` for
    arrays; ``new_tokens`` must be positive (an empty step takes no time: callers skip it)."""
    flops = c.flops_per_token * new_tokens + c.flops_per_pair * attn_pairs
    weights = c.dense_bytes + c.expert_bytes * (1.0 - c.expert_untouched ** new_tokens)
    memory = weights + c.kv_bytes_per_token * (kv_read_tokens + new_tokens)
    return c.overhead_s + maximum(flops / c.peak_flops, memory / c.bandwidth) + c.comm_s_per_token * new_tokens


class CostModel:
    """Step times and capacities for one model on one accelerator in one deployment."""

    __slots__ = ("model", "accelerator", "deployment", "efficiency", "roofline", "_kv_tok")

    def __init__(
        self,
        model: ModelProfile | str,
        accelerator: AcceleratorProfile | str,
        deployment: Deployment | None = None,
        efficiency: Efficiency | None = None,
    ) -> None:
        self.model = resolve_model(model) if isinstance(model, str) else model
        self.accelerator = resolve_accelerator(accelerator) if isinstance(accelerator, str) else accelerator
        self.deployment = deployment or default_deployment(self.model, self.accelerator)
        self.efficiency = efficiency or Efficiency()
        m, a, d, e = self.model, self.accelerator, self.deployment, self.efficiency
        peak = a.fp8_flops if m.weight_bytes_per_param <= 1.0 else a.bf16_flops
        expert_bytes = m.expert_params * m.weight_bytes_per_param
        self._kv_tok = m.kv_bytes_per_token
        self.roofline = Roofline(
            overhead_s=e.step_overhead_s,
            flops_per_token=2.0 * m.active_params,
            flops_per_pair=m.attn_flops_per_pair * m.layers,
            peak_flops=d.gpus * peak * e.mfu,
            dense_bytes=m.total_params * m.weight_bytes_per_param - expert_bytes,
            expert_bytes=expert_bytes,
            expert_untouched=1.0 - m.experts_per_token / m.num_experts if m.is_moe else 1.0,
            kv_bytes_per_token=m.kv_bytes_per_token,
            bandwidth=d.gpus * a.hbm_bytes_per_s * e.mbu,
            comm_s_per_token=self._collective_seconds_per_token(),
        )

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> float:
        r = self.roofline
        return float(r.dense_bytes + r.expert_bytes)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the pod can hold after weights and activation reserve, as vLLM sizes it."""
        a, e, d = self.accelerator, self.efficiency, self.deployment
        free = d.gpus * (a.hbm_bytes * e.gpu_memory_utilization - e.activation_reserve_bytes) - self.weight_bytes
        if free <= 0:
            raise ValueError(
                f"{self.model.name} does not fit on {d.gpus} x {a.name} "
                f"(weights {self.weight_bytes / 1e9:.0f} GB); raise tp/ep"
            )
        return int(free / self._kv_tok)

    def num_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens // block_size

    def kv_bytes(self, tokens: float) -> float:
        return tokens * self._kv_tok

    # ---- time -----------------------------------------------------------------------------------
    def step_time(self, new_tokens: float, attn_pairs: float, kv_read_tokens: float) -> float:
        """Seconds for one engine step that processes ``new_tokens`` (prefill chunks + one per decode).

        ``attn_pairs`` are the query-key pairs its attention computes, ``kv_read_tokens`` the context
        tokens whose KV it reads. Use ``prefill_pairs`` to count pairs for a prefill chunk. Token counts may
        be fractional where they are expected values (predictions).
        """
        if new_tokens <= 0:
            return 0.0
        return float(step_seconds(self.roofline, new_tokens, attn_pairs, kv_read_tokens))

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` after ``cached_tokens`` already in cache, in one pass."""
        return self.step_time(new_tokens, prefill_pairs(new_tokens, cached_tokens), cached_tokens)

    def decode_step_time(self, batch: int, kv_tokens: float) -> float:
        """Seconds for one decode step of ``batch`` requests holding ``kv_tokens`` of context in all."""
        return self.step_time(batch, kv_tokens, kv_tokens)

    def time_to_first_token(self, prompt: float, cached: float = 0.0, *, budget: float = 8192.0,
                            queued: float = 0.0, running: float = 0.0, decode_context: float = 0.0) -> float:
        """Seconds until a request's first token on an engine that schedules as vLLM does, step by step.

        Every step carries one token for each of the ``running`` decodes (each with ``decode_context`` tokens
        of KV) and fills the rest of its ``budget`` (max_num_batched_tokens) with prefill: first the
        ``queued`` prompt tokens ahead of this request (taken as fresh prompts), then this prompt's
        ``prompt - cached`` new tokens in chunks, each attending to the cached prefix and the chunks before
        it. The decodes never take more than 90 % of a step. This loop is the reference;
        ``engine.costmodel.vector.ttft_seconds`` computes the same sum in closed form for many pods.
        """
        r = min(running, 0.9 * budget)
        chunk = budget - r
        d_pairs = r * decode_context
        total, left = 0.0, queued
        while left > 0:
            c = min(chunk, left)
            total += self.step_time(c + r, c * (c + 1) / 2.0 + d_pairs, d_pairs)
            left -= c
        new = max(prompt - cached, 1.0)
        done = 0.0
        while done < new:
            c = min(chunk, new - done)
            ctx = cached + done
            total += self.step_time(c + r, c * ctx + c * (c + 1) / 2.0 + d_pairs, ctx + d_pairs)
            done += c
        return total

    def transfer_time(self, tokens: int, link: LinkProfile | str = "rdma-400g") -> float:
        """Seconds to move ``tokens`` of KV from a prefill pod to a decode pod (one NIC per GPU)."""
        link = resolve_link(link) if isinstance(link, str) else link
        if tokens <= 0:
            return 0.0
        return link.latency_s + self.kv_bytes(tokens) / (link.bytes_per_s * self.deployment.gpus)

    # ---- internals ------------------------------------------------------------------------------
    def _collective_seconds_per_token(self) -> float:
        m, a, d, e = self.model, self.accelerator, self.deployment, self.efficiency

        def link_bw(gpus: int) -> float:
            raw = a.scale_up_bytes_per_s if gpus <= _SCALE_UP_DOMAIN else _SCALE_OUT_BYTES_PER_S
            return raw * e.comm

        seconds = 0.0
        if d.tp > 1:
            # Two ring all-reduces per layer; each GPU moves 2 (tp-1)/tp of the activation.
            per_layer = 2 * 2 * (d.tp - 1) / d.tp * m.hidden * _TP_ACT_BYTES
            seconds += m.layers * per_layer / link_bw(d.tp)
        if d.ep > 1 and m.is_moe:
            # Dispatch + combine: each token's hidden state goes to k experts, (ep-1)/ep of them remote;
            # tokens are spread over the ep GPUs, which send in parallel.
            per_layer = 2 * m.experts_per_token * (d.ep - 1) / d.ep * m.hidden * _EP_ACT_BYTES / d.ep
            seconds += m.layers * per_layer / link_bw(d.ep)
        return seconds

    def describe(self) -> str:
        d = self.deployment
        return (
            f"{self.model.name} on {d.gpus}x{self.accelerator.name} (tp={d.tp}, ep={d.ep}): "
            f"KV {self.kv_capacity_tokens:,} tokens, 1k-token prefill {self.prefill_time(1024) * 1e3:.1f} ms, "
            f"decode step b=32 ctx=2k {self.decode_step_time(32, 32 * 2048) * 1e3:.1f} ms"
        )


def prefill_pairs(new_tokens: int, cached_tokens: int) -> float:
    """Causal-attention query-key pairs for ``new_tokens`` appended after ``cached_tokens``."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2.0


def default_deployment(model: ModelProfile, accelerator: AcceleratorProfile) -> Deployment:
    """The smallest power-of-two tensor (or expert) parallel size the model fits in, unless profiled."""
    if accelerator.name in model.default_ep:
        return Deployment(tp=1, ep=model.default_ep[accelerator.name])
    if accelerator.name in model.default_tp:
        return Deployment(tp=model.default_tp[accelerator.name])
    tp = 1
    weights = model.total_params * model.weight_bytes_per_param
    while weights > 0.6 * tp * accelerator.hbm_bytes and tp < 64:
        tp *= 2
    return Deployment(tp=tp, ep=tp if model.is_moe and tp > 1 else 1)
