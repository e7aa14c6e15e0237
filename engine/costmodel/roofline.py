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

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Deployment:
    """How one engine instance (one pod, one vLLM server) spreads over GPUs."""

    tp: int = 1  # tensor parallel
    ep: int = 1  # GPUs the routed experts are spread over; attention then runs data parallel

    @property
    def gpus(self) -> int:
        return max(self.tp, self.ep)


class CostModel:
    """Step times and capacities for one model on one accelerator in one deployment."""

    __slots__ = (
        "model", "accelerator", "deployment", "efficiency", "_peak", "_bw", "_dense_bytes",
        "_expert_bytes", "_kv_tok", "_attn", "_comm_per_token",
    )

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
        self._peak = d.gpus * peak * e.mfu
        self._bw = d.gpus * a.hbm_bytes_per_s * e.mbu
        self._expert_bytes = m.expert_params * m.weight_bytes_per_param
        self._dense_bytes = m.total_params * m.weight_bytes_per_param - self._expert_bytes
        self._kv_tok = m.kv_bytes_per_token
        self._attn = m.attn_flops_per_pair * m.layers
        self._comm_per_token = self._collective_seconds_per_token()

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> float:
        return self._dense_bytes + self._expert_bytes

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

    def kv_bytes(self, tokens: int) -> float:
        return tokens * self._kv_tok

    # ---- time -----------------------------------------------------------------------------------
    def step_time(self, new_tokens: int, attn_pairs: float, kv_read_tokens: float) -> float:
        """Seconds for one engine step that processes ``new_tokens`` (prefill chunks + one per decode).

        ``attn_pairs`` are the query-key pairs its attention computes, ``kv_read_tokens`` the context
        tokens whose KV it reads. Use ``prefill_pairs`` to count pairs for a prefill chunk.
        """
        if new_tokens <= 0:
            return 0.0
        m = self.model
        flops = 2.0 * m.active_params * new_tokens + self._attn * attn_pairs
        weights = self._dense_bytes
        if m.is_moe:
            untouched = (1.0 - m.experts_per_token / m.num_experts) ** new_tokens
            weights += self._expert_bytes * (1.0 - untouched)
        memory = weights + self._kv_tok * (kv_read_tokens + new_tokens)
        roof = max(flops / self._peak, memory / self._bw)
        return self.efficiency.step_overhead_s + roof + self._comm_per_token * new_tokens

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` after ``cached_tokens`` already in cache, in one pass."""
        return self.step_time(new_tokens, prefill_pairs(new_tokens, cached_tokens), cached_tokens)

    def decode_step_time(self, batch: int, kv_tokens: int) -> float:
        """Seconds for one decode step of ``batch`` requests holding ``kv_tokens`` of context in all."""
        return self.step_time(batch, kv_tokens, kv_tokens)

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
