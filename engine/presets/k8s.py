"""Prefill and decode Deployments from the presets (``gateway-api/components/pd/fleet.yaml`` is this output).

    python -m engine.presets.k8s 8b H100 --prefill 2 --decode 4 > gateway-api/components/pd/fleet.yaml

Each pod carries the labels kvswitch's discovery reads (``llm-d.ai/role``, ``kvswitch.io/accelerator``,
``kvswitch.io/model``; annotations ``kvswitch.io/kv-events-port`` and ``kvswitch.io/block-size``) and the pool's
selector label. vLLM gets probes on ``/health`` (a startup probe long enough to download and load the model), the
model cache volume (``HF_HOME`` on a shared PersistentVolumeClaim), a memory-backed ``/dev/shm`` and the Hugging
Face token from the Secret ``hf-token`` (optional: public models need none). Decode pods run the kvswitch sidecar
on the pool's port in front of vLLM; it accepts the prefill pods the picker signs (``--picker-secret-file``, the
Secret ``kvswitch-prefill-signing`` the picker signs with), so no allow-list file has to be kept in step with
the fleet. Engines that span several pods (``pods_per_engine > 1``) need a LeaderWorkerSet and are refused here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from engine.presets.recipes import ENGINE_PORT, EnginePreset, preset

POOL_LABEL = {"app.kubernetes.io/part-of": "kvswitch-fleet"}
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
KVSWITCH_IMAGE = "kvswitch:0.1.0"
MODEL_CACHE_CLAIM = "vllm-model-cache"
SIGNING_SECRET = "kvswitch-prefill-signing"
HF_SECRET = "hf-token"
SHM_SIZE = "16Gi"


def _env(p: EnginePreset) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "value": v} for k, v in p.env().items()]
    env += [{"name": "HF_HOME", "value": "/models"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token",
                                                                "optional": True}}}]
    return env


def _probes(port: int | str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        return {"path": "/health", "port": port}

    return {
        # model download + load: up to 30 minutes before liveness applies
        "startupProbe": {"httpGet": get(), "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": get(), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": get(), "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def _vllm(p: EnginePreset) -> dict[str, Any]:
    # behind the sidecar (decode pods) the pod's "http" port is the sidecar's; vLLM's is "engine"
    names = {"http": "engine"} if p.role == "decode" else {}
    return {
        "name": "vllm",
        "image": VLLM_IMAGE,
        "command": p.command(),
        "env": _env(p),
        "ports": [{"name": names.get(n, n), "containerPort": port, "protocol": "TCP"}
                  for n, port in p.container_ports().items()],
        **_probes(names.get("http", "http")),
        "resources": p.resources(),
        "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _sidecar(p: EnginePreset) -> dict[str, Any]:
    connector = "nixl" if p.connector == "nixl" else "shared-storage"
    return {
        "name": "sidecar",
        "image": KVSWITCH_IMAGE,
        "args": ["sidecar", "--port", str(ENGINE_PORT), "--decode-url", f"http://127.0.0.1:{p.port}",
                 "--connector", connector, "--picker-secret-file", "/etc/kvswitch-signing/key"],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        # /health passes through to the local vLLM: the pod is Ready only when both are
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/sidecar/metrics", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "signing", "mountPath": "/etc/kvswitch-signing", "readOnly": True}],
    }


def deployment(p: EnginePreset, replicas: int) -> dict[str, Any]:
    if p.pods > 1:
        raise ValueError(f"{p.model} on {p.accelerator} spans {p.pods} pods per engine: use a LeaderWorkerSet")
    name = f"vllm-{p.role}"
    containers = [_vllm(p)] if p.role != "decode" else [_sidecar(p), _vllm(p)]
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": MODEL_CACHE_CLAIM}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
    ]
    if p.role == "decode":
        volumes.append({"name": "signing", "secret": {"secretName": SIGNING_SECRET}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name, **POOL_LABEL, **p.labels()},
                    "annotations": {"kvswitch.io/kv-events-port": str(p.kv_events_port),
                                    "kvswitch.io/block-size": str(p.block_size)},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 120,  # vLLM finishes what it is serving
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


def fleet(model: str, accelerator: str, prefill: int, decode: int, connector: str = "nixl") -> list[dict]:
    return [deployment(preset(model, accelerator, "prefill", connector), prefill),
            deployment(preset(model, accelerator, "decode", connector), decode)]


def render(docs: list[dict], command: str) -> str:
    head = f"# Generated by `{command}` (engine/presets/k8s.py). Do not edit by hand.\n"
    return head + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.presets.k8s", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("accelerator")
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--connector", choices=["nixl", "shared-storage"], default="nixl")
    a = ap.parse_args(argv)
    try:
        docs = fleet(a.model, a.accelerator, a.prefill, a.decode, a.connector)
    except ValueError as exc:
        ap.error(str(exc))
    cmd = (f"python -m engine.presets.k8s {a.model} {a.accelerator} --prefill {a.prefill} --decode {a.decode}"
           + (f" --connector {a.connector}" if a.connector != "nixl" else ""))
    sys.stdout.write(render(docs, cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
