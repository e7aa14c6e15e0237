"""Hardware and model profiles: the published numbers the cost model is built from.

Every constant here names its source. Accelerator figures are the vendors' datasheet numbers for dense
BF16 tensor throughput (no sparsity) and HBM bandwidth; model figures come from the models' published
``config.json``. Efficiencies (how much of the peak a serving engine reaches) live in ``Efficiency``
beside them, so the one place to calibrate against a measured profile is obvious.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True, slots=True)
class AcceleratorProfile:
    """One GPU as a roofline: compute peak, memory bandwidth and capacity, scale-up link."""

    name: str
    bf16_flops: float  # dense BF16 tensor FLOP/s
    fp8_flops: float  # dense FP8 tensor FLOP/s (== bf16 where the chip has no FP8 path)
    hbm_bytes_per_s: float
    hbm_bytes: float
    scale_up_bytes_per_s: float  # per-GPU, one direction (NVLink / Infinity Fabric / PCIe)
    vendor: str = "nvidia"


# Sources: NVIDIA H100 SXM5, H200 SXM, A100 SXM4 80GB, L40S datasheets; AMD Instinct MI300X datasheet.
ACCELERATORS: dict[str, AcceleratorProfile] = {
    a.name: a
    for a in (
        AcceleratorProfile("H100", 989 * TFLOPS, 1979 * TFLOPS, 3.35e12, 80 * GB, 450 * GB),
        AcceleratorProfile("H200", 989 * TFLOPS, 1979 * TFLOPS, 4.8e12, 141 * GB, 450 * GB),
        AcceleratorProfile("A100", 312 * TFLOPS, 312 * TFLOPS, 2.039e12, 80 * GB, 300 * GB),
        AcceleratorProfile("L40S", 362 * TFLOPS, 733 * TFLOPS, 0.864e12, 48 * GB, 32 * GB),
        AcceleratorProfile("MI300X", 1307 * TFLOPS, 2615 * TFLOPS, 5.3e12, 192 * GB, 64 * GB, "amd"),
    )
}


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """A path KV blocks take between two pods (prefill -> decode), per GPU, one direction."""

    name: str
    bytes_per_s: float
    latency_s: float  # fixed cost of one transfer: handshake, descriptor exchange, first byte


# 400 Gb/s RDMA NICs (one per GPU, as on DGX H100 / ConnectX-7) reach ~45 GB/s of 50 in practice;
# TCP over 100 GbE for clusters without RDMA; NVLink when prefill and decode share a node.
LINKS: dict[str, LinkProfile] = {
    link.name: link
    for link in (
        LinkProfile("rdma-400g", 45 * GB, 0.002),
        LinkProfile("rdma-200g", 22 * GB, 0.002),
        LinkProfile("tcp-100g", 8 * GB, 0.005),
        LinkProfile("nvlink", 400 * GB, 0.0005),
    )
}


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The shape of a model as far as time and memory go.

    ``attn_flops_per_pair`` is the multiply-adds x 2 one query token spends on one key token in one layer
    (QK^T plus AV over all heads); ``kv_bytes_per_token`` is what one token's KV cache weighs across
    all layers. For MoE models ``active_params`` is what one token touches; ``expert_params`` is the
    weight of all routed experts together, read in proportion to how many distinct experts a step hits.
    """

    name: str
    total_params: float
    active_params: float
    layers: int
    hidden: int
    attn_flops_per_pair: float
    kv_bytes_per_token_per_layer: float
    weight_bytes_per_param: float = 2.0  # BF16; 1.0 for FP8 checkpoints
    num_experts: int = 0
    experts_per_token: int = 0
    expert_params: float = 0.0
    max_model_len: int = 32768
    default_tp: dict[str, int] = field(default_factory=dict)  # accelerator -> tensor parallel size
    default_ep: dict[str, int] = field(default_factory=dict)  # accelerator -> expert parallel size (GPUs)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_per_layer * self.layers


def _gqa(layers: int, heads: int, kv_heads: int, head_dim: int, kv_dtype_bytes: float = 2.0) -> tuple[float, float]:
    """(attention FLOPs per query-key pair per layer, KV bytes per token per layer) for GQA attention."""
    attn = 4.0 * heads * head_dim  # 2 FLOPs/MAC x (QK^T + AV)
    kv = 2.0 * kv_heads * head_dim * kv_dtype_bytes  # K and V
    return attn, kv


_L8_ATTN, _L8_KV = _gqa(32, 32, 8, 128)
_L70_ATTN, _L70_KV = _gqa(80, 64, 8, 128)
_Q3_ATTN, _Q3_KV = _gqa(48, 32, 4, 128)
# DeepSeek-V3 MLA: the cache holds the 512-dim latent plus 64 rope dims per token per layer (BF16);
# attention runs in the absorbed form, 128 heads x (576 + 512) dims per pair.
_DS_ATTN = 2.0 * 128 * (576 + 512)
_DS_KV = (512 + 64) * 2.0

# Sources: meta-llama/Llama-3.1-8B-Instruct, Llama-3.1-70B-Instruct, Qwen/Qwen3-30B-A3B and
# deepseek-ai/DeepSeek-V3 config.json files.
MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in (
        ModelProfile(
            "llama-3.1-8b", 8.03e9, 8.03e9, 32, 4096, _L8_ATTN, _L8_KV, max_model_len=131072,
            default_tp={"L40S": 1},
        ),
        ModelProfile(
            "llama-3.1-70b", 70.6e9, 70.6e9, 80, 8192, _L70_ATTN, _L70_KV, max_model_len=131072,
            default_tp={"H100": 4, "H200": 2, "A100": 4, "MI300X": 1, "L40S": 8},
        ),
        ModelProfile(
            "qwen3-30b-a3b", 30.5e9, 3.3e9, 48, 2048, _Q3_ATTN, _Q3_KV,
            num_experts=128, experts_per_token=8, expert_params=48 * 128 * 3 * 2048 * 768,
            max_model_len=40960, default_tp={"L40S": 2},
        ),
        ModelProfile(
            "deepseek-v3", 671e9, 37e9, 61, 7168, _DS_ATTN, _DS_KV, weight_bytes_per_param=1.0,
            num_experts=256, experts_per_token=8, expert_params=58 * 256 * 3 * 7168 * 2048,
            max_model_len=163840,
            default_ep={"H100": 16, "H200": 8, "A100": 32, "MI300X": 8, "L40S": 32},
        ),
    )
}

# Short names people type on the command line.
MODEL_ALIASES = {"8b": "llama-3.1-8b", "70b": "llama-3.1-70b", "moe": "qwen3-30b-a3b", "dsv3": "deepseek-v3"}


@dataclass(frozen=True, slots=True)
class Efficiency:
    """How much of the roofline a tuned serving engine reaches.

    Defaults: large-GEMM prefill reaches ~40-50 % MFU in vLLM/SGLang on Hopper (published MLPerf and
    vLLM perf dashboards); memory-bound decode reaches ~70-80 % of HBM bandwidth with CUDA graphs; a
    scheduler step costs ~1 ms of CPU and launch time that no kernel hides; collectives run at ~70 %
    of the link's peak.
    """

    mfu: float = 0.45
    mbu: float = 0.75
    comm: float = 0.7
    step_overhead_s: float = 0.001
    gpu_memory_utilization: float = 0.90
    activation_reserve_bytes: float = 2 * GB  # per GPU, for activations and CUDA graphs


def resolve_model(name: str) -> ModelProfile:
    key = MODEL_ALIASES.get(name, name)
    try:
        return MODELS[key]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; known: {', '.join(sorted(MODELS))}") from None


def resolve_accelerator(name: str) -> AcceleratorProfile:
    try:
        return ACCELERATORS[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown accelerator {name!r}; known: {', '.join(sorted(ACCELERATORS))}"
        ) from None


def resolve_link(name: str) -> LinkProfile:
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; known: {', '.join(sorted(LINKS))}") from None
