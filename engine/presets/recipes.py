"""Model x accelerator x role recipes: the vLLM command line, environment, labels and resources of a pod.

Parallelism comes from the shared cost model (``engine.costmodel.default_deployment``), so the pods we
deploy are the pods the simulator, scorers and planner reason about. Per role:

* prefill: large ``--max-num-batched-tokens`` (long prompts in few chunks), NIXL ``kv_producer``;
* decode: smaller batches of new tokens (inter-token latency), NIXL ``kv_consumer``; vLLM listens on
  8200 behind the sidecar, which takes the pod's 8000;
* both: ``kv_both``, a middle budget.

On CPUs (``accelerator="CPU"``) only the shared-storage connector works (vLLM ``ExampleConnector``, kv_both
for every role: matching is by prompt), and memory is set with ``VLLM_CPU_KVCACHE_SPACE``.

Mixture-of-experts models (DeepSeek-V3, Qwen3-30B-A3B) run wide expert parallelism: data-parallel attention
(``--data-parallel-size`` ranks, each with its own scheduler, KV cache and queue behind the pod's one HTTP
port) and the routed experts spread over every GPU of the group (``--enable-expert-parallel``), with an
all-to-all backend per vendor and role (DeepEP high-throughput kernels for prefill, low-latency kernels for
decode on NVIDIA; vLLM's allgather/reduce-scatter on AMD) and expert load balancing (``--enable-eplb``) for
the models that implement vLLM's ``MixtureOfExperts`` interface. A group larger than one node becomes a
leader pod and worker pods (``EngineGroup``; a LeaderWorkerSet in Kubernetes):

* ``multinode="hybrid"`` (default): every node serves HTTP for its own ranks (``--data-parallel-start-rank``
  = node x ranks per node, vLLM's hybrid load balancing), so the picker routes to (node, local rank);
* ``multinode="internal"``: the leader serves every rank and the workers run ``--headless``.

With data parallelism vLLM offsets the KV-event port by the rank's global index (5557 + rank), labels
per-rank metrics ``engine="<rank>"`` and takes a target rank per request in ``X-data-parallel-rank``
(the rank among the ranks that pod serves). ``EngineGroup.pods[i].ranks`` lists them for discovery.

Speculative decoding is an option (``speculative="auto"`` takes the model's own: MTP heads for DeepSeek-V3,
EAGLE-3 heads or a small draft model for the others); ``Speculative.acceptance`` is what the cost model
needs to turn steps into tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.costmodel import Deployment, Efficiency, default_deployment, resolve_accelerator, resolve_model
from engine.costmodel.speculative import Speculative

ROLES = ("prefill", "decode", "both")
CONNECTORS = ("nixl", "shared-storage")
MULTINODE = ("hybrid", "internal")
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
# Models whose vLLM implementation has the MixtureOfExperts interface (expert load balancing, --enable-eplb):
# vllm/model_executor/models/deepseek_v2.py and qwen3_moe.py in vLLM 0.32.
_EPLB_MODELS = frozenset({"deepseek-v3", "qwen3-30b-a3b"})
# Expert-parallel layouts (GPUs the experts span; attention runs one data-parallel rank per GPU) where the
# cost model's default is tensor parallel: Qwen3-30B-A3B fits one GPU, so DP4 x EP4 gives four schedulers
# and four KV caches per pod with a quarter of the experts each.
_EP_LAYOUTS = {
    ("qwen3-30b-a3b", "H100"): 4, ("qwen3-30b-a3b", "H200"): 4, ("qwen3-30b-a3b", "MI300X"): 4,
}

ENGINE_PORT = 8000  # what the pod exposes (the sidecar's port on decode pods)
DECODE_ENGINE_PORT = 8200  # vLLM behind the sidecar on decode pods
KV_EVENTS_PORT = 5557  # rank r publishes on KV_EVENTS_PORT + r (vLLM offsets the port by the DP rank)
NIXL_SIDE_CHANNEL_PORT = 5600
DP_RPC_PORT = 13345  # the leader's data-parallel RPC port (multi-node groups)
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"  # LeaderWorkerSet's downward-API variable with the leader's address
_BATCHED_TOKENS = {"prefill": 16384, "decode": 2048, "both": 8192}
_CPU_BATCHED_TOKENS = {"prefill": 4096, "decode": 1024, "both": 2048}
_MAX_NUM_SEQS = {"prefill": 64, "decode": 256, "both": 256}


# Per model: the speculative decoding its publishers recommend. DeepSeek-V3 ships one MTP layer (its paper
# reports 85-90 % acceptance of the second token); EAGLE-3 heads for Llama (SafeAILab's published heads);
# Qwen3-30B-A3B drafts with Qwen3-0.6B (same tokenizer).
SPECULATIVE = {
    "deepseek-v3": Speculative("mtp", 1, None, acceptance=0.85, draft_cost=1 / 61),
    "llama-3.1-8b": Speculative("eagle3", 3, "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", acceptance=0.7,
                                draft_cost=1 / 32),
    "llama-3.1-70b": Speculative("eagle3", 3, "yuhuili/EAGLE3-LLaMA3.3-Instruct-70B", acceptance=0.7,
                                 draft_cost=1 / 80),
    "qwen3-30b-a3b": Speculative("draft_model", 3, "Qwen/Qwen3-0.6B", acceptance=0.6, draft_cost=0.2),
}


@dataclass(frozen=True, slots=True)
class PodRecipe:
    """One pod of an engine group: its command line, environment, labels, resources and ports.

    ``ranks`` are the global data-parallel ranks whose engine cores run in this pod; ``serves_http`` says
    whether the pod runs an API server, and then ``ranks[i]`` is the one a request reaches with
    ``X-data-parallel-rank: i`` (hybrid groups, single-node pods). A headless worker's ranks are served by
    the leader (internal load balancing). Rank ``r`` publishes KV events on port ``5557 + r`` of the pod
    it runs in and is labelled ``engine="r"`` in the metrics of the pod that serves it.
    """

    node_rank: int
    role: str  # "leader" or "worker"
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    resources: dict[str, dict[str, str]]
    ports: dict[str, int]
    ranks: tuple[int, ...]
    serves_http: bool


@dataclass(frozen=True, slots=True)
class EngineGroup:
    """The pods of one engine instance (leader first); a single pod for engines that fit one node."""

    preset: EnginePreset
    pods: list[PodRecipe]

    @property
    def leader(self) -> PodRecipe:
        return self.pods[0]

    @property
    def workers(self) -> list[PodRecipe]:
        return self.pods[1:]


@dataclass(frozen=True, slots=True)
class EnginePreset:
    """One engine instance (one vLLM server, or a group of pods for wide expert parallelism)."""

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
    all2all_backend: str | None = None  # None: vLLM's default (with expert parallelism: set per vendor/role)
    enable_eplb: bool = False
    speculative: Speculative | None = None
    multinode: str = "hybrid"
    dp_rpc_port: int = DP_RPC_PORT
    leader_address: str = LEADER_ADDRESS
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

    @property
    def ranks_per_pod(self) -> int:
        """Data-parallel ranks (engine cores, schedulers, KV caches) in one pod."""
        return max(1, self.data_parallel // self.pods)

    def pod_ranks(self, node_rank: int) -> tuple[int, ...]:
        start = node_rank * self.ranks_per_pod
        return tuple(range(start, start + self.ranks_per_pod))

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
        """The base endpoint; vLLM publishes rank r's events on this port + r."""
        return {"enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{self.kv_events_port}", "topic": "kv-events"}

    def vllm_args(self, node_rank: int = 0) -> list[str]:
        """Arguments after ``vllm serve`` for pod ``node_rank`` of the group (0: the leader)."""
        if not 0 <= node_rank < self.pods:
            raise ValueError(f"node_rank must be in [0, {self.pods}), got {node_rank}")
        args = [
            "--model", self.model_path,
            "--port", str(self.port),
            "--block-size", str(self.block_size),
            "--max-model-len", str(self.max_model_len),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--max-num-seqs", str(self.max_num_seqs),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo", "sha256_cbor",
            "--kv-transfer-config", _json(self.kv_transfer_config()),
            "--kv-events-config", _json(self.kv_events_config()),
        ]
        if self.vendor != "cpu":
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}"]
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.expert_parallel:
            args += ["--enable-expert-parallel"]
            if self.all2all_backend:
                args += ["--all2all-backend", self.all2all_backend]
            if self.enable_eplb:
                args += ["--enable-eplb"]
            if self.data_parallel > 1:
                args += ["--data-parallel-size", str(self.data_parallel)]
                if self.pods > 1:
                    args += [
                        "--data-parallel-size-local", str(self.ranks_per_pod),
                        "--data-parallel-address", self.leader_address,
                        "--data-parallel-rpc-port", str(self.dp_rpc_port),
                    ]
                    if node_rank > 0:
                        args += ["--data-parallel-start-rank", str(node_rank * self.ranks_per_pod)]
                        if self.multinode == "internal":
                            args += ["--headless"]
        if self.speculative is not None:
            args += ["--speculative-config", _json(self.speculative.config())]
        return args + list(self.extra_args)

    def command(self, node_rank: int = 0) -> list[str]:
        return ["vllm", "serve", *self.vllm_args(node_rank)]

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

    def labels(self, node_rank: int = 0) -> dict[str, str]:
        out = {
            "llm-d.ai/role": self.role,
            "llm-d.ai/inferenceServing": "true",
            "kvswitch.io/accelerator": self.accelerator,
            "kvswitch.io/model": self.model,
        }
        if self.data_parallel > 1:
            ranks = self.pod_ranks(node_rank)
            out["kvswitch.io/dp-size"] = str(len(ranks))  # ranks this pod runs
            out["kvswitch.io/dp-start-rank"] = str(ranks[0])
        if self.pods > 1:
            out["kvswitch.io/group-role"] = "leader" if node_rank == 0 else "worker"
            if node_rank > 0 and self.multinode == "internal":
                out["llm-d.ai/inferenceServing"] = "false"  # headless: no HTTP server to route to
        return out

    def resources(self) -> dict[str, dict[str, str]]:
        """Kubernetes requests/limits of one pod."""
        if self.vendor == "cpu":
            mem = f"{4 + self.cpu_kvcache_gib}Gi"
            return {"requests": {"cpu": "2", "memory": mem}, "limits": {"memory": mem}}
        key = "amd.com/gpu" if self.vendor == "amd" else "nvidia.com/gpu"
        n = str(self.gpus_per_pod)
        return {"requests": {key: n}, "limits": {key: n}}

    def container_ports(self, node_rank: int = 0) -> dict[str, int]:
        """Named ports of pod ``node_rank``: HTTP, one KV-event port per rank it runs, NIXL side channel."""
        ports = {"http": self.port}
        ranks = self.pod_ranks(node_rank) if self.data_parallel > 1 else (0,)
        if len(ranks) == 1 and ranks[0] == 0:
            ports["kv-events"] = self.kv_events_port
        else:
            for r in ranks:
                ports[f"kv-events-{r}"] = self.kv_events_port + r
        if self.connector == "nixl":
            ports["nixl"] = NIXL_SIDE_CHANNEL_PORT
        if self.pods > 1 and node_rank == 0:
            ports["dp-rpc"] = self.dp_rpc_port
        return ports

    def group(self) -> EngineGroup:
        """Every pod of this engine (leader first), ready to render as a Deployment or LeaderWorkerSet."""
        pods = []
        for n in range(self.pods):
            ranks = self.pod_ranks(n) if self.data_parallel > 1 else (0,)
            serves = n == 0 or self.multinode == "hybrid"
            if n == 0 and self.multinode == "internal" and self.pods > 1:
                ranks = tuple(range(self.data_parallel))  # the leader serves every rank
            pods.append(PodRecipe(n, "leader" if n == 0 else "worker", self.command(n), self.env(),
                                  self.labels(n), self.resources(), self.container_ports(n), ranks, serves))
        return EngineGroup(self, pods)


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _all2all(vendor: str, role: str, pods: int) -> str:
    """DeepEP on NVIDIA (high-throughput kernels where prefill dominates, low-latency for decode); vLLM's
    allgather/reduce-scatter on AMD within a node, MoRI across nodes."""
    if vendor == "amd":
        return "allgather_reducescatter" if pods == 1 else (
            "mori_low_latency" if role == "decode" else "mori_high_throughput")
    return "deepep_low_latency" if role == "decode" else "deepep_high_throughput"


def preset(
    model: str,
    accelerator: str,
    role: str,
    connector: str = "nixl",
    *,
    model_path: str | None = None,
    deployment: Deployment | None = None,
    speculative: str | Speculative | None = None,
    **overrides: object,
) -> EnginePreset:
    """The recipe for ``model`` (cost-model name or alias) on ``accelerator`` in ``role``.

    ``model_path`` replaces the Hugging Face repository (a local folder, a tiny test model); ``deployment``
    replaces the parallelism (MoE models default to data-parallel attention + expert parallelism);
    ``speculative`` is ``"auto"`` (the model's own, ``SPECULATIVE``), a ``Speculative``, or None; other
    keyword arguments override EnginePreset fields.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    if connector not in CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}; known: {', '.join(CONNECTORS)}")
    profile = resolve_model(model)
    port = DECODE_ENGINE_PORT if role == "decode" else ENGINE_PORT
    spec: Speculative | None
    if speculative == "auto":
        spec = SPECULATIVE.get(profile.name)
        if spec is None:
            raise ValueError(f"no speculative decoding recipe for {profile.name}")
    elif isinstance(speculative, str):
        raise ValueError(f"speculative must be 'auto', a Speculative or None, got {speculative!r}")
    else:
        spec = speculative
    if accelerator.upper() == CPU:
        if connector == "nixl":
            raise ValueError("NixlConnector needs a GPU; use connector='shared-storage' on CPU")
        fields = dict(
            model=profile.name, model_path=model_path or MODEL_REPOS.get(profile.name, profile.name),
            accelerator=CPU, vendor="cpu", role=role, connector=connector,
            deployment=deployment or Deployment(), block_size=128,
            max_num_batched_tokens=_CPU_BATCHED_TOKENS[role], max_num_seqs=_MAX_NUM_SEQS[role],
            max_model_len=min(profile.max_model_len, 4096), gpu_memory_utilization=0.0, port=port,
            speculative=spec,
        )
    else:
        acc = resolve_accelerator(accelerator)
        if deployment is None and (profile.name, acc.name) in _EP_LAYOUTS:
            deployment = Deployment(tp=1, ep=_EP_LAYOUTS[(profile.name, acc.name)])
        dep = deployment or default_deployment(profile, acc)
        ep = dep.ep > 1 and profile.is_moe
        pods = max(1, -(-dep.gpus // GPUS_PER_NODE))
        fields = dict(
            model=profile.name, model_path=model_path or MODEL_REPOS.get(profile.name, profile.name),
            accelerator=acc.name, vendor=acc.vendor, role=role, connector=connector,
            deployment=dep,
            block_size=64 if profile.name in _MLA_MODELS else 16,
            max_num_batched_tokens=_BATCHED_TOKENS[role], max_num_seqs=_MAX_NUM_SEQS[role],
            max_model_len=profile.max_model_len, gpu_memory_utilization=Efficiency().gpu_memory_utilization,
            port=port, all2all_backend=_all2all(acc.vendor, role, pods) if ep else None,
            enable_eplb=ep and profile.name in _EPLB_MODELS, speculative=spec,
        )
    fields.update(overrides)
    if "extra_args" in fields:
        fields["extra_args"] = tuple(fields["extra_args"])  # type: ignore[arg-type]
    unknown = set(fields) - set(EnginePreset.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown preset field(s): {', '.join(sorted(unknown))}")
    if fields.get("multinode", "hybrid") not in MULTINODE:
        raise ValueError(f"multinode must be one of {', '.join(MULTINODE)}")
    return EnginePreset(**fields)  # type: ignore[arg-type]


# The presets the README lists and the parser test checks: model x accelerator, every role.
MOE_PRESETS = tuple((m, a) for m in ("deepseek-v3", "qwen3-30b-a3b") for a in ("H100", "H200", "MI300X"))
DENSE_PRESETS = tuple((m, a) for m in ("llama-3.1-8b", "llama-3.1-70b") for a in ("H100", "H200", "MI300X"))


def all_presets() -> list[EnginePreset]:
    """Every listed preset in every role, with and without speculative decoding, both multi-node modes."""
    out = []
    for model, acc in MOE_PRESETS + DENSE_PRESETS:
        for role in ROLES:
            for spec in (None, "auto"):
                out.append(preset(model, acc, role, speculative=spec))
                p = out[-1]
                if p.pods > 1:
                    out.append(preset(model, acc, role, speculative=spec, multinode="internal"))
    out.append(preset("8b", CPU, "both", "shared-storage"))
    return out
