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
    p = preset("qwen3-30b-a3b", "H100", "decode")
    args = p.vllm_args()
    assert flag(args, "--tensor-parallel-size") == "2" and "--enable-expert-parallel" in args
    assert "--data-parallel-size" not in args and p.gpus == 2


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
