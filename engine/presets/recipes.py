"""Model x accelerator x role recipes: the vLLM command line, environment, labels and resources of a pod.

Parallelism comes from the shared cost model (``engine.costmodel.default_deployment``), so the pods we
deploy are the pods the simulator, scorers and planner reason about. Per role:

* prefill: large ``--max-num-batched-tokens`` (long prompts in few chunks), NIXL ``kv_producer``;
* decode: smaller batches of new tokens (inter-token latency), NIXL ``kv_consumer``; vLLM listens on
  8200 behind the sidecar, which takes the pod's 8000;
* both: ``kv_both``, a middle budget.

On CPUs (``accelerator="CPU"``) only the shared-storage connector works (vLLM ``ExampleConnector``, kv_both
for every role: matching is by prompt), and memory is set with ``VLLM_CPU_KVCACHE_SPACE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.costmodel import Deployment, Efficiency, default_deployment, resolve_accelerator, resolve_model

ROLES = ("prefill", "decode", "both")
CONNECTORS = ("nixl", "shared-storage")
CPU = "CPU"
GPUS_PER_NODE = 8

# Hugging Face repositories of the cost model's profiles.
MODEL_REPOS = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
}
_MLA_MODELS = frozenset({"deepseek-v3"})  # FlashMLA wants 64-token blocks

ENGINE_PORT = 8000  # what the pod exposes (the sidecar's port on decode pods)
DECODE_ENGINE_PORT = 8200  # vLLM behind the sidecar on decode pods
KV_EVENTS_PORT = 5557
NIXL_SIDE_CHANNEL_PORT = 5600
_BATCHED_TOKENS = {"prefill": 16384, "decode": 2048, "both": 8192}
_CPU_BATCHED_TOKENS = {"prefill": 4096, "decode": 1024, "both": 2048}
_MAX_NUM_SEQS = {"prefill": 64, "decode": 256, "both": 256}


@dataclass(frozen=True, slots=True)
class EnginePreset:
    """One engine instance (one vLLM server) of a model on an accelerator in a role."""

    model: str  # cost-model profile name, e.g. "llama-3.1-70b"
    model_path: str  # what vLLM loads (HF repo or a local folder)
    accelerator: str  # "H100", ..., or "CPU"
    vendor: str  # "nvidia", "amd" or "cpu"
    role: str
    connector: str
    deployment: Deployment
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    port: int
    kv_events_port: int = KV_EVENTS_PORT
    shared_storage_path: str = "/kv-shared"
    cpu_kvcache_gib: int = 1
    extra_args: tuple[str, ...] = field(default=())

    # ---- parallelism ----------------------------------------------------------------------------
    @property
    def tensor_parallel(self) -> int:
        return self.deployment.tp

    @property
    def data_parallel(self) -> int:
        """Attention data-parallel ranks: with expert parallelism, experts span tp x dp GPUs."""
        d = self.deployment
        return d.ep // d.tp if d.ep > 1 else 1

    @property
    def expert_parallel(self) -> bool:
        return self.deployment.ep > 1

    @property
    def gpus(self) -> int:
        return 0 if self.vendor == "cpu" else self.tensor_parallel * self.data_parallel

    @property
    def pods(self) -> int:
        """Pods one engine spans (data-parallel ranks beyond a node go to more pods, e.g. a LeaderWorkerSet)."""
        return max(1, -(-self.gpus // GPUS_PER_NODE))

    @property
    def gpus_per_pod(self) -> int:
        return self.gpus // self.pods if self.gpus else 0

    # ---- outputs --------------------------------------------------------------------------------
    def kv_role(self) -> str:
        if self.connector == "shared-storage" or self.role == "both":
            return "kv_both"
        return "kv_producer" if self.role == "prefill" else "kv_consumer"

    def kv_transfer_config(self) -> dict:
        if self.connector == "nixl":
            return {"kv_connector": "NixlConnector", "kv_role": self.kv_role()}
        return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": self.shared_storage_path}}

    def kv_events_config(self) -> dict:
        return {"enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{self.kv_events_port}", "topic": "kv-events"}

    def vllm_args(self) -> list[str]:
        """Arguments after ``vllm serve`` (or ``python -m vllm.entrypoints.openai.api_server``)."""
        args = [
            "--model", self.model_path,
            "--port", str(self.port),
            "--block-size", str(self.block_size),
            "--max-model-len", str(self.max_model_len),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--max-num-seqs", str(self.max_num_seqs),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo", "sha256_cbor",
            "--kv-transfer-config", json.dumps(self.kv_transfer_config(), separators=(",", ":")),
            "--kv-events-config", json.dumps(self.kv_events_config(), separators=(",", ":")),
        ]
        if self.vendor != "cpu":
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}"]
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.expert_parallel:
            args += ["--enable-expert-parallel"]
            if self.data_parallel > 1:
                args += ["--data-parallel-size", str(self.data_parallel)]
                if self.pods > 1:
                    args += ["--data-parallel-size-local", str(self.gpus_per_pod // self.tensor_parallel)]
        return args + list(self.extra_args)

    def command(self) -> list[str]:
        return ["vllm", "serve", *self.vllm_args()]

    def env(self, pod_ip: str = "$(POD_IP)") -> dict[str, str]:
        """Environment of the engine container; ``$(POD_IP)`` is the Kubernetes downward-API spelling."""
        env = {"PYTHONHASHSEED": "42"}  # stable block hashes across restarts (precise prefix routing)
        if self.connector == "nixl":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = pod_ip
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(NIXL_SIDE_CHANNEL_PORT)
            env["UCX_TLS"] = "cuda_ipc,cuda_copy,tcp" if self.vendor == "nvidia" else "rocm_ipc,rocm_copy,tcp"
        if self.vendor == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_gib)
        return env

    def labels(self) -> dict[str, str]:
        return {
            "llm-d.ai/role": self.role,
            "llm-d.ai/inferenceServing": "true",
            "kvswitch.io/accelerator": self.accelerator,
            "kvswitch.io/model": self.model,
        }

    def resources(self) -> dict[str, dict[str, str]]:
        """Kubernetes requests/limits of one pod."""
        if self.vendor == "cpu":
            mem = f"{4 + self.cpu_kvcache_gib}Gi"
            return {"requests": {"cpu": "2", "memory": mem}, "limits": {"memory": mem}}
        key = "amd.com/gpu" if self.vendor == "amd" else "nvidia.com/gpu"
        n = str(self.gpus_per_pod)
        return {"requests": {key: n}, "limits": {key: n}}

    def container_ports(self) -> dict[str, int]:
        ports = {"http": self.port, "kv-events": self.kv_events_port}
        if self.connector == "nixl":
            ports["nixl"] = NIXL_SIDE_CHANNEL_PORT
        return ports


def preset(
    model: str,
    accelerator: str,
    role: str,
    connector: str = "nixl",
    *,
    model_path: str | None = None,
    deployment: Deployment | None = None,
    **overrides: object,
) -> EnginePreset:
    """The recipe for ``model`` (cost-model name or alias) on ``accelerator`` in ``role``.

    ``model_path`` replaces the Hugging Face repository (a local folder, a tiny test model); ``deployment``
    replaces the cost model's parallelism; other keyword arguments override EnginePreset fields.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    if connector not in CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}; known: {', '.join(CONNECTORS)}")
    profile = resolve_model(model)
    port = DECODE_ENGINE_PORT if role == "decode" else ENGINE_PORT
    if accelerator.upper() == CPU:
        if connector == "nixl":
            raise ValueError("NixlConnector needs a GPU; use connector='shared-storage' on CPU")
        fields = dict(
            model=profile.name, model_path=model_path or MODEL_REPOS.get(profile.name, profile.name),
            accelerator=CPU, vendor="cpu", role=role, connector=connector,
            deployment=deployment or Deployment(), block_size=128,
            max_num_batched_tokens=_CPU_BATCHED_TOKENS[role], max_num_seqs=_MAX_NUM_SEQS[role],
            max_model_len=min(profile.max_model_len, 4096), gpu_memory_utilization=0.0, port=port,
        )
    else:
        acc = resolve_accelerator(accelerator)
        fields = dict(
            model=profile.name, model_path=model_path or MODEL_REPOS.get(profile.name, profile.name),
            accelerator=acc.name, vendor=acc.vendor, role=role, connector=connector,
            deployment=deployment or default_deployment(profile, acc),
            block_size=64 if profile.name in _MLA_MODELS else 16,
            max_num_batched_tokens=_BATCHED_TOKENS[role], max_num_seqs=_MAX_NUM_SEQS[role],
            max_model_len=profile.max_model_len, gpu_memory_utilization=Efficiency().gpu_memory_utilization,
            port=port,
        )
    fields.update(overrides)
    if "extra_args" in fields:
        fields["extra_args"] = tuple(fields["extra_args"])  # type: ignore[arg-type]
    unknown = set(fields) - set(EnginePreset.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown preset field(s): {', '.join(sorted(unknown))}")
    return EnginePreset(**fields)  # type: ignore[arg-type]
