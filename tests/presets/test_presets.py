"""Recipes turn into the exact vLLM flags, env, labels and resources each pod needs."""

from __future__ import annotations

import json

import pytest

from engine.costmodel import Deployment
from engine.presets import preset


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def test_70b_on_h100_prefill():
    p = preset("llama-3.1-70b", "H100", "prefill")
    args = p.vllm_args()
    assert flag(args, "--tensor-parallel-size") == "4"
    assert json.loads(flag(args, "--kv-transfer-config")) == {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    assert flag(args, "--model") == "meta-llama/Llama-3.1-70B-Instruct"
    assert flag(args, "--port") == "8000"
    assert flag(args, "--max-num-batched-tokens") == "16384"
    assert flag(args, "--block-size") == "16"
    assert flag(args, "--gpu-memory-utilization") == "0.90"
    assert "--enable-prefix-caching" in args and "--enable-expert-parallel" not in args
    assert p.resources() == {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}
    assert p.labels()["llm-d.ai/role"] == "prefill" and p.labels()["kvswitch.io/accelerator"] == "H100"
    assert p.env()["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "$(POD_IP)"


def test_70b_decode_sits_behind_the_sidecar_with_a_smaller_token_budget():
    p = preset("70b", "H200", "decode")
    args = p.vllm_args()
    assert flag(args, "--tensor-parallel-size") == "2"
    assert json.loads(flag(args, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    assert flag(args, "--port") == "8200"
    assert int(flag(args, "--max-num-batched-tokens")) < int(flag(preset("70b", "H200", "prefill").vllm_args(),
                                                                 "--max-num-batched-tokens"))


def test_deepseek_v3_on_h200_is_expert_parallel_over_eight():
    p = preset("deepseek-v3", "H200", "decode")
    args = p.vllm_args()
    assert "--enable-expert-parallel" in args
    assert flag(args, "--data-parallel-size") == "8"
    assert "--tensor-parallel-size" not in args and "--data-parallel-size-local" not in args
    assert flag(args, "--block-size") == "64"
    assert p.gpus == 8 and p.pods == 1
    assert p.resources()["requests"] == {"nvidia.com/gpu": "8"}


def test_deepseek_v3_on_h100_spans_two_nodes():
    p = preset("deepseek-v3", "H100", "prefill")
    args = p.vllm_args()
    assert flag(args, "--data-parallel-size") == "16" and flag(args, "--data-parallel-size-local") == "8"
    assert p.pods == 2 and p.resources()["requests"] == {"nvidia.com/gpu": "8"}


def test_moe_with_tensor_and_expert_parallel():
    p = preset("qwen3-30b-a3b", "H100", "decode", deployment=Deployment(tp=2, ep=2))
    args = p.vllm_args()
    assert flag(args, "--tensor-parallel-size") == "2" and "--enable-expert-parallel" in args
    assert "--data-parallel-size" not in args and p.gpus == 2


def test_qwen3_moe_defaults_to_data_parallel_attention_with_expert_parallel():
    for acc, backend, key in (("H100", "deepep_low_latency", "nvidia.com/gpu"),
                              ("MI300X", "allgather_reducescatter", "amd.com/gpu")):
        p = preset("qwen3-30b-a3b", acc, "decode")
        args = p.vllm_args()
        assert flag(args, "--data-parallel-size") == "4" and "--tensor-parallel-size" not in args
        assert flag(args, "--all2all-backend") == backend and "--enable-eplb" in args
        assert "--data-parallel-address" not in args  # one node: no RPC between nodes
        assert p.resources()["requests"] == {key: "4"}
        assert p.labels()["kvswitch.io/dp-size"] == "4" and p.labels()["kvswitch.io/dp-start-rank"] == "0"
        # vLLM offsets the KV-event port by the rank: one named port per rank
        assert p.container_ports() == {"http": 8200, "kv-events-0": 5557, "kv-events-1": 5558,
                                       "kv-events-2": 5559, "kv-events-3": 5560, "nixl": 5600}
    assert flag(preset("qwen3-30b-a3b", "H200", "prefill").vllm_args(), "--all2all-backend") == "deepep_high_throughput"


def test_multi_node_group_is_a_leader_and_workers():
    p = preset("deepseek-v3", "H100", "decode")
    g = p.group()
    assert [pod.role for pod in g.pods] == ["leader", "worker"]
    lead, work = g.leader, g.workers[0]
    assert lead.ranks == tuple(range(8)) and work.ranks == tuple(range(8, 16))
    assert lead.serves_http and work.serves_http  # hybrid: each node serves its own ranks
    assert "--data-parallel-start-rank" not in lead.command
    assert flag(work.command, "--data-parallel-start-rank") == "8"
    for pod in g.pods:
        assert flag(pod.command, "--data-parallel-address") == "$(LWS_LEADER_ADDRESS)"
        assert flag(pod.command, "--data-parallel-rpc-port") == "13345"
    assert work.ports["kv-events-8"] == 5565 and "dp-rpc" in lead.ports and "dp-rpc" not in work.ports
    assert work.labels["kvswitch.io/dp-start-rank"] == "8" and work.labels["kvswitch.io/group-role"] == "worker"
    internal = preset("deepseek-v3", "H100", "decode", multinode="internal").group()
    assert "--headless" in internal.workers[0].command and not internal.workers[0].serves_http
    assert internal.leader.ranks == tuple(range(16))  # the leader's API server reaches every rank
    assert internal.workers[0].labels["llm-d.ai/inferenceServing"] == "false"
    with pytest.raises(ValueError, match="multinode"):
        preset("deepseek-v3", "H100", "decode", multinode="ring")
    with pytest.raises(ValueError, match="node_rank"):
        p.vllm_args(2)


def test_speculative_decoding_is_an_option():
    ds = preset("deepseek-v3", "H200", "decode", speculative="auto")
    assert json.loads(flag(ds.vllm_args(), "--speculative-config")) == {"method": "mtp", "num_speculative_tokens": 1}
    q = preset("qwen3-30b-a3b", "H100", "decode", speculative="auto")
    cfg = json.loads(flag(q.vllm_args(), "--speculative-config"))
    assert cfg["method"] == "draft_model" and cfg["model"] == "Qwen/Qwen3-0.6B"
    assert "--speculative-config" not in preset("deepseek-v3", "H200", "decode").vllm_args()
    assert 1.0 < ds.speculative.tokens_per_step <= 2.0  # one MTP token: 1 + acceptance
    with pytest.raises(ValueError, match="speculative"):
        preset("8b", "H100", "decode", speculative="medusa")


def test_amd_and_both_role():
    p = preset("8b", "MI300X", "both")
    assert json.loads(flag(p.vllm_args(), "--kv-transfer-config"))["kv_role"] == "kv_both"
    assert p.resources()["requests"] == {"amd.com/gpu": "1"}
    assert p.env()["UCX_TLS"].startswith("rocm")


def test_kv_events_config_for_precise_routing():
    p = preset("8b", "H100", "decode", kv_events_port=6000)
    cfg = json.loads(flag(p.vllm_args(), "--kv-events-config"))
    assert cfg == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6000",
                   "topic": "kv-events"}


def test_cpu_uses_the_shared_storage_connector():
    p = preset("8b", "CPU", "prefill", "shared-storage", model_path="/models/tiny", shared_storage_path="/tmp/kv")
    args = p.vllm_args()
    assert json.loads(flag(args, "--kv-transfer-config")) == {
        "kv_connector": "ExampleConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}
    assert flag(args, "--model") == "/models/tiny" and flag(args, "--block-size") == "128"
    assert "--gpu-memory-utilization" not in args and "--tensor-parallel-size" not in args
    assert p.env() == {"PYTHONHASHSEED": "42", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "nvidia.com/gpu" not in p.resources()["requests"]
    with pytest.raises(ValueError, match="needs a GPU"):
        preset("8b", "CPU", "prefill", "nixl")


def test_deployment_override_and_bad_input():
    p = preset("70b", "H100", "decode", deployment=Deployment(tp=8))
    assert flag(p.vllm_args(), "--tensor-parallel-size") == "8"
    for kwargs, match in [(dict(role="router"), "role"), (dict(connector="lmcache"), "connector"),
                          (dict(accelerator="TPU"), "accelerator"), (dict(model="gpt-9"), "model")]:
        base = dict(model="8b", accelerator="H100", role="decode", connector="nixl") | kwargs
        with pytest.raises(ValueError, match=match):
            preset(**base)
    with pytest.raises(ValueError, match="bogus"):
        preset("8b", "H100", "decode", bogus=1)
