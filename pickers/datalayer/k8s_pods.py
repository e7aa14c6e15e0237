"""From Kubernetes objects to endpoints: the InferencePool's spec and what a selected pod contributes.

Pure functions over the API's JSON (no I/O), so the mapping is tested without a server.

A pod is an endpoint while it is Ready (condition ``Ready=True``), has an IP and is not being deleted; it
gives one endpoint per pool target port (``ip:port``; several target ports are several data-parallel ranks
or engines of one pod, as the Gateway API Inference Extension defines them). What kvswitch reads from a pod
(label, or annotation of the same name; the label wins):

- ``kvswitch.io/role`` or llm-d's ``llm-d.ai/role``: ``prefill`` / ``decode`` / ``both`` (default ``both``)
- ``kvswitch.io/accelerator``: cost-model accelerator kind, H100, H200, A100, L40S or MI300X (default: from
  the node selector, below, else H100)
- ``kvswitch.io/model``: cost-model profile, llama-3.1-8b, llama-3.1-70b, 8b, ... as ``engine/presets``
  labels pods (default llama-3.1-8b)
- ``kvswitch.io/served-model``: the model name vLLM serves; LoRA affinity compares it (default "")
- ``kvswitch.io/kv-events-port``: vLLM's ZMQ KV-event port, ``tcp://<pod ip>:<port>`` (default none: no
  precise prefix index for the pod)
- ``kvswitch.io/metrics-port``: port of ``/metrics`` when it is not the target port (default the target port)
- ``kvswitch.io/block-size``: the engine's KV block size in tokens (default: the container's ``--block-size``,
  else 16)
- ``kvswitch.io/max-num-seqs``, ``kvswitch.io/max-num-batched-tokens``: the engine's sequence slots and step
  token budget (default: the container's ``--max-num-seqs`` / ``--max-num-batched-tokens``, else the preset of
  the pod's model, accelerator and role): the predictor's slot wait and chunked-prefill steps use them

Engine flags from the pod spec: the containers' ``command`` and ``args`` are read as vLLM's command line
(``--flag N``, ``--flag=N``, underscores or dashes; an element holding a shell command line, as in ``sh -c
"vllm serve ..."``, is split as the shell would). A flag given twice takes its last value, as argparse does; a
value that is not a positive integer leaves the pod out.

With several target ports, ``kv-events-port`` and ``metrics-port`` may list one port per target port,
comma-separated, in the same order (one value applies to all). An accelerator or model the cost model does not
know is logged and replaced by the default (the pod still serves); a role that is not one of the three, or a
malformed port, leaves the pod out (routing decode traffic to a pod whose role is unknown could break it).

Accelerator from the node: kvswitch reads no Node objects (that would need a ClusterRole); it reads the pod's
``spec.nodeSelector`` and required node-affinity terms for the usual GPU product labels
(``nvidia.com/gpu.product``, ``cloud.google.com/gke-accelerator``, ``amd.com/gpu.product-name``,
``karpenter.k8s.aws/instance-gpu-name``) and finds a known kind in the value: ``NVIDIA-H100-80GB-HBM3`` ->
H100, ``nvidia-h200-141gb`` -> H200, ``AMD_Instinct_MI300X`` -> MI300X.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from typing import Any

from engine.costmodel import resolve_accelerator, resolve_model
from pickers.types import Endpoint, Role

log = logging.getLogger("kvswitch.pickers.k8s")

PREFIX = "kvswitch.io/"
ROLE_KEYS = (PREFIX + "role", "llm-d.ai/role")
ACCELERATOR_KEY = PREFIX + "accelerator"
MODEL_PROFILE_KEY = PREFIX + "model"
SERVED_MODEL_KEY = PREFIX + "served-model"
KV_EVENTS_PORT_KEY = PREFIX + "kv-events-port"
METRICS_PORT_KEY = PREFIX + "metrics-port"
BLOCK_SIZE_KEY = PREFIX + "block-size"
MAX_NUM_SEQS_KEY = PREFIX + "max-num-seqs"
MAX_BATCHED_TOKENS_KEY = PREFIX + "max-num-batched-tokens"
ENGINE_FLAGS = ("block-size", "max-num-seqs", "max-num-batched-tokens")  # the vLLM flags read from the spec
GPU_PRODUCT_KEYS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "amd.com/gpu.product-name",
                    "karpenter.k8s.aws/instance-gpu-name")
# The cost model's accelerator kinds (engine/costmodel/profiles.py ACCELERATORS), longest first so that a
# token like L40S is not read as a shorter kind.
KNOWN_ACCELERATORS = ("MI300X", "H200", "H100", "A100", "L40S")
DEFAULT_ACCELERATOR = "H100"
DEFAULT_MODEL_PROFILE = "llama-3.1-8b"


class PoolError(ValueError):
    """The InferencePool cannot be used (no selector, no target ports); the message says which field."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What kvswitch uses of an InferencePool (``inference.networking.k8s.io/v1``)."""

    name: str
    selector: tuple[tuple[str, str], ...]  # matchLabels, sorted
    target_ports: tuple[int, ...]

    @property
    def label_selector(self) -> str:
        """The ``labelSelector`` query value that selects the pool's pods."""
        return ",".join(f"{k}={v}" for k, v in self.selector)


def pool_spec(obj: dict[str, Any]) -> PoolSpec:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    name = str(meta.get("name", ""))
    labels = ((spec.get("selector") or {}).get("matchLabels")) or {}
    if not isinstance(labels, dict) or not labels:
        raise PoolError(f"InferencePool {name}: spec.selector.matchLabels is empty (it would select every pod)")
    ports = []
    for i, p in enumerate(spec.get("targetPorts") or []):
        n = p.get("number") if isinstance(p, dict) else None
        if not isinstance(n, int) or not 0 < n < 65536:
            raise PoolError(f"InferencePool {name}: spec.targetPorts[{i}].number is not a port: {n!r}")
        ports.append(n)
    if not ports:
        raise PoolError(f"InferencePool {name}: spec.targetPorts is empty")
    return PoolSpec(name, tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(ports))


def accelerator_from_product(value: str) -> str | None:
    """A known accelerator kind named in a GPU product label value, or None."""
    for token in re.split(r"[^A-Z0-9]+", value.upper()):
        for kind in KNOWN_ACCELERATORS:
            if token.startswith(kind):
                return kind
    return None


def _node_terms(spec: dict[str, Any]) -> dict[str, str]:
    """Node labels the pod requires: nodeSelector plus single-value ``In`` terms of required affinity."""
    out = {str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()}
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            values = expr.get("values") or []
            if expr.get("operator") == "In" and len(values) == 1:
                out.setdefault(str(expr.get("key")), str(values[0]))
    return out


def _ports(value: str | None, n: int, what: str, pod: str) -> list[int | None]:
    if not value:
        return [None] * n
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 1:
        parts *= n
    if len(parts) != n or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts):
        raise ValueError(f"pod {pod}: {what} {value!r} must be one port or one per target port ({n})")
    return [int(p) for p in parts]


def engine_flags(spec: dict[str, Any]) -> dict[str, str]:
    """The ``ENGINE_FLAGS`` set on the pod's containers' command lines (see the module docstring): flag -> its
    last value, as given."""
    words: list[str] = []
    for c in spec.get("containers") or []:
        for part in [*(c.get("command") or []), *(c.get("args") or [])]:
            text = str(part)
            try:
                words += shlex.split(text) if any(ch.isspace() for ch in text) else [text]
            except ValueError:  # unbalanced quotes: not a command line we can read
                words.append(text)
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        name, eq, value = w[2:].partition("=")
        name = name.replace("_", "-")
        if name in ENGINE_FLAGS:
            if eq:
                out[name] = value
            elif i + 1 < len(words):
                out[name] = words[i + 1]
    return out


def _positive(value: str | None, what: str, pod: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"pod {pod}: {what} {value!r} is not a positive integer")
    return int(value)


def is_ready(pod: dict[str, Any]) -> bool:
    """Ready condition True, an IP, and not being deleted (graceful deletion sets deletionTimestamp first)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_endpoints(pod: dict[str, Any], pool: PoolSpec) -> list[Endpoint]:
    """The endpoints a pod gives the pool now: none unless it is ready; raises ValueError on bad labels."""
    if not is_ready(pod):
        return []
    meta = pod.get("metadata") or {}
    name = str(meta.get("name", "?"))
    labels: dict[str, str] = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    notes: dict[str, str] = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}

    def get(key: str) -> str | None:
        return labels.get(key, notes.get(key))

    role_value = next((v for k in ROLE_KEYS if (v := get(k)) is not None), "both")
    try:
        role = Role(role_value)
    except ValueError:
        raise ValueError(f"pod {name}: role {role_value!r} is not prefill, decode or both") from None
    accel = get(ACCELERATOR_KEY)
    if accel is None:
        node = _node_terms(pod.get("spec") or {})
        accel = next((a for k in GPU_PRODUCT_KEYS if k in node and (a := accelerator_from_product(node[k]))),
                     DEFAULT_ACCELERATOR)
    try:
        accel = resolve_accelerator(accel).name
    except ValueError:
        log.warning("pod %s: accelerator %r unknown to the cost model; costed as %s", name, accel,
                    DEFAULT_ACCELERATOR)
        accel = DEFAULT_ACCELERATOR
    profile = get(MODEL_PROFILE_KEY) or DEFAULT_MODEL_PROFILE
    try:
        profile = resolve_model(profile).name
    except ValueError:
        log.warning("pod %s: model %r unknown to the cost model; costed as %s", name, profile,
                    DEFAULT_MODEL_PROFILE)
        profile = DEFAULT_MODEL_PROFILE
    flags = engine_flags(pod.get("spec") or {})
    block_size = _positive(get(BLOCK_SIZE_KEY) or flags.get("block-size") or "16", "block size", name)
    max_seqs = _positive(get(MAX_NUM_SEQS_KEY) or flags.get("max-num-seqs"), "max-num-seqs", name)
    max_batched = _positive(get(MAX_BATCHED_TOKENS_KEY) or flags.get("max-num-batched-tokens"),
                            "max-num-batched-tokens", name)
    n = len(pool.target_ports)
    kv_ports = _ports(get(KV_EVENTS_PORT_KEY), n, KV_EVENTS_PORT_KEY, name)
    metrics_ports = _ports(get(METRICS_PORT_KEY), n, METRICS_PORT_KEY, name)
    ip = str((pod.get("status") or {})["podIP"])
    host = f"[{ip}]" if ":" in ip else ip
    out = []
    for port, kv, mp in zip(pool.target_ports, kv_ports, metrics_ports):
        out.append(Endpoint(
            address=f"{host}:{port}", role=role, model=get(SERVED_MODEL_KEY) or "", accelerator=accel,
            model_profile=profile, labels=labels,
            metrics_url=f"http://{host}:{mp}/metrics" if mp else None,
            kv_events=f"tcp://{host}:{kv}" if kv else None, block_size=block_size or 16,
            max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
        ))
    return out
