"""PodSpec: what one simulated pod is (model, accelerator, role, cache shape, ports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PodSpec:
    name: str = "pod-0"
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen at start
    kv_events_port: int | None = 0  # 0: a free port; None: no KV event publisher
    model_name: str = "sim-model"  # the served model name (what requests' "model" must say)
    model_profile: str = "llama-3.1-8b"  # cost-model profile
    accelerator: str = "H100"
    role: str = "both"  # both | prefill | decode (NixlConnector kv_both / kv_producer / kv_consumer)
    block_size: int = 16
    num_blocks: int | None = None  # None: from the cost model's KV capacity
    tp: int | None = None  # None: the cost model's default deployment
    ep: int | None = None
    seed: int | None = None  # hash root and fault draws; None: random, like vLLM without PYTHONHASHSEED
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    link: str = "rdma-400g"  # KV transfer link for do_remote_prefill
    kv_transfer_timeout_s: float = 30.0  # held prefill blocks are freed after this (simulated s)
    event_format: str = "map"  # map (vLLM 0.32) | array (older vLLM)
    kv_events_topic: str = "kv-events"
    kv_events_replay_port: int | None = None  # 0: a free port; None: no replay socket
    eos_after: int | None = 512  # output length at which the model "emits EOS" unless ignore_eos
    max_pending: int = 4096  # requests in flight beyond this get 503
    dp_rank: int = 0  # the rank a single-engine pod reports in KV event batches
    dp_size: int = 1  # data-parallel engine cores behind the pod's port (wide expert parallelism)
    speculative: bool = False  # the model's speculative decoding (engine.presets.SPECULATIVE)


def speculative_for(model_profile: str):  # -> engine.costmodel.speculative.Speculative
    """The speculative decoding a pod of this model runs with ``speculative: true`` (its preset's)."""
    from engine.costmodel import resolve_model
    from engine.presets import SPECULATIVE

    name = resolve_model(model_profile).name
    if name not in SPECULATIVE:
        raise ValueError(f"no speculative decoding recipe for {name}")
    return SPECULATIVE[name]
