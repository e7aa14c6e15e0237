"""Routers under test behind one interface: ``make_router(name, workdir).start(fleet)`` -> base URL, ``stop()``.

Names:
- ``kvswitch`` or ``kvswitch:<profile>``: Envoy + ``kvswitch serve`` (profile default, round-robin,
  load-only, approximate, precise; ``kvswitch`` alone is the default profile).
- ``envoy-rr``: Envoy alone, a static cluster over the pods, round robin (the floor every picker must beat).
- ``vllm-router:<policy>``: cache_aware, kv_aware (subscribes to each pod's KV events), power_of_two,
  round_robin, random, consistent_hash.
- ``sglang-router:<policy>``: cache_aware, round_robin, power_of_two, random.
- P/D (``fleet.roles`` has prefill and decode pods): ``kvswitch`` gets prefill pods with role=prefill
  (its decider chooses a prefill leg); ``vllm-router:<policy>`` runs ``--vllm-pd-disaggregation``.

Every router runs as its own process group on free ports; ``start`` returns once a one-token completion
through the router succeeds, so a router that is up but cannot reach the pods fails loudly with its log.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Protocol

import yaml

from e2e.bench import peersenv
from e2e.bench.fleet import cache_block_size, scrape, scrape_by_label
from e2e.bench.procs import Proc
from e2e.support.ports import free_port

READY_TIMEOUT_S = 60.0
KVSWITCH_PROFILES = ("default", "round-robin", "load-only", "approximate", "precise")
VLLM_ROUTER_POLICIES = ("cache_aware", "kv_aware", "power_of_two", "round_robin", "random", "consistent_hash")
PD_HANDLER = "prefill-decode"  # pickers' P/D profile handler (scheduler.handler.type)
SGLANG_ROUTER_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")


class FleetView(Protocol):
    """What a router needs to know about the fleet (SimFleetProcess has it)."""

    addresses: list[str]
    urls: list[str]
    kv_event_endpoints: list[str]
    roles: list[str]
    model: str
    accelerator: str
    model_profile: str


def probe_completion(base_url: str, model: str, timeout: float = 10.0) -> bool:
    """One non-streamed one-token completion through the router: True when it answers 200."""
    body = json.dumps({"model": model, "prompt": "ready?", "max_tokens": 1}).encode()
    req = urllib.request.Request(base_url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status == 200


class Router:
    """Base: subclasses build their processes in ``_launch`` and return the base URL."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.workdir = name, Path(workdir)
        self.procs: list[Proc] = []
        self.url: str | None = None
        self.starts = 0

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")

    def _proc(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(f"{self.name} ({label})", cmd, self.workdir / f"{self.slug}-{label}-{self.starts}.log", env)
        self.procs.append(p)
        return p

    def _launch(self, fleet: FleetView) -> str:
        raise NotImplementedError

    def start(self, fleet: FleetView, timeout: float = READY_TIMEOUT_S, attempts: int = 3) -> str:
        """Launch and wait until a completion goes through. A port picked free can be taken (e.g. as the
        source port of some client's connection) before the router binds it, so a failed start is retried
        on fresh ports; each attempt's logs are kept."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.starts += 1
            try:
                self.url = self._launch(fleet)
                last = self.procs[-1]
                last.wait_until(lambda: probe_completion(self.url, fleet.model), timeout,
                                "serving a completion through the router")
                return self.url
            except Exception:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        self.url = None

    def own_prefills(self) -> tuple[float, float]:
        """(wall seconds, count) of the prompts the router itself has sent the pods so far, as it timed them:
        the pods' TTFT histograms count them beside the client's requests. (0, 0): it sends none."""
        return 0.0, 0.0

    def kv_lookups(self) -> dict[str, float]:
        """Lookups of the router's own KV index so far, by result (hit, miss, ...): {} for a router without
        one. A peer whose index never hits has not taken the pods' KV events (their topic, their block size)
        and is not the router its users run."""
        return {}


def _envoy_cmd(config: Path) -> list[str]:
    return [str(peersenv.envoy_binary()), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn",
            "--concurrency", "1"]


def envoy_rr_bootstrap(listen_port: int, admin_port: int, addresses: list[str]) -> dict:
    """Envoy alone: one listener, one static round-robin cluster over the pods, no timeouts on streams."""
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": a.rpartition(":")[0],
                                                     "port_value": int(a.rpartition(":")[2])}}}}
        for a in addresses
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "bench",
        "stream_idle_timeout": "0s",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "pods", "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "bench", "address": {"socket_address": {"address": "127.0.0.1",
                                                                            "port_value": listen_port}},
                           "per_connection_buffer_limit_bytes": 32 * 1024 * 1024,
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{"name": "pods", "type": "STATIC", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s",
                          "per_connection_buffer_limit_bytes": 32 * 1024 * 1024,
                          "circuit_breakers": {"thresholds": [{"max_connections": 100000,
                                                               "max_pending_requests": 100000,
                                                               "max_requests": 100000}]},
                          "load_assignment": {"cluster_name": "pods", "endpoints": [{"lb_endpoints": endpoints}]}}],
        },
    }


class EnvoyRoundRobin(Router):
    def _launch(self, fleet: FleetView) -> str:
        port, admin = free_port(), free_port()
        cfg = self.workdir / f"{self.slug}-envoy.yaml"
        cfg.write_text(yaml.safe_dump(envoy_rr_bootstrap(port, admin, fleet.addresses), sort_keys=False))
        self._proc("envoy", _envoy_cmd(cfg))
        return f"http://127.0.0.1:{port}"


class KvSwitch(Router):
    """Envoy + ``kvswitch serve`` with one scheduler profile."""

    def __init__(self, name: str, workdir: Path, profile: str = "default") -> None:
        super().__init__(name, workdir)
        self.profile = profile
        self.metrics_url: str | None = None  # the picker's /metrics, once launched

    def own_prefills(self) -> tuple[float, float]:
        """The picker's warm-up pieces (pickers/warmup.py), from its kvswitch_warmup_piece_seconds."""
        if self.metrics_url is None:
            return 0.0, 0.0
        m = scrape(self.metrics_url, prefix="kvswitch_warmup_piece_seconds")
        return m.get("kvswitch_warmup_piece_seconds_sum", 0.0), m.get("kvswitch_warmup_piece_seconds_count", 0.0)

    def picker_config(self, fleet: FleetView, grpc_port: int, metrics_port: int,
                      sidecars: dict[str, str] | None = None, decide_port: int = -1) -> dict:
        """The picker's YAML: every pod with its role, accelerator and model profile (the cost model's
        inputs), KV events and metrics; a decode pod behind a sidecar is addressed at its sidecar."""
        sidecars = sidecars or {}
        accelerator = getattr(fleet, "accelerator", None)
        profile = getattr(fleet, "model_profile", None)
        endpoints = []
        for addr, url, kv, role in zip(fleet.addresses, fleet.urls, fleet.kv_event_endpoints, fleet.roles):
            ep = {"address": sidecars.get(addr, addr), "role": role, "model": fleet.model, "kv_events": kv,
                  "metrics_url": url + "/metrics"}
            if accelerator:
                ep["accelerator"] = accelerator
            if profile:
                ep["model_profile"] = profile
            endpoints.append(ep)
        scheduler: dict = {"profile": self.profile}
        time_scale = float(getattr(fleet, "time_scale", 1.0))
        if time_scale != 1.0:  # simulated pods at a time scale: predict their steps in wall seconds
            scheduler["predictor"] = {"time_scale": time_scale}
        tokenizer = getattr(fleet, "tokenizer", None)
        if tokenizer:  # the picker must hash the very token ids the pods hash
            scheduler["tokenizer"] = {"path": str(tokenizer)}
        if sidecars:  # P/D fleet: the picker's prefill-decode handler decides whether and where to prefill
            scheduler["handler"] = {"type": PD_HANDLER}
        # drain_seconds: nothing is in flight when a run ends; do not wait 10 s per run for it.
        return {"server": {"host": "127.0.0.1", "grpc_port": grpc_port, "metrics_port": metrics_port,
                           "decide_port": decide_port, "drain_seconds": 0.5},
                "endpoints": endpoints, "scheduler": scheduler}

    def _start_sidecars(self, fleet: FleetView) -> dict[str, str]:
        """One ``kvswitch sidecar`` per decode pod of a P/D fleet (engine address -> sidecar address).

        The sidecar runs the prefill leg the picker names (x-prefiller-host-port, only towards the fleet's
        prefill pods) and then decodes on its pod with the NIXL-style kv_transfer_params handshake.
        """
        prefill = [a for a, r in zip(fleet.addresses, fleet.roles) if r == "prefill"]
        if not prefill:
            return {}
        out = {}
        for addr, role in zip(fleet.addresses, fleet.roles):
            if role != "decode":
                continue
            port = free_port()
            cmd = [sys.executable, "-m", "extproc.cli", "sidecar", "--host", "127.0.0.1", "--port", str(port),
                   "--decode-url", f"http://{addr}", "--connector", "nixl", "--log-level", "warning"]
            for p in prefill:
                cmd += ["--prefill-pod", p]
            sc = self._proc(f"sidecar-{port}", cmd)
            sc.wait_until(lambda port=port: _port_open(port), READY_TIMEOUT_S, "listening")
            out[addr] = f"127.0.0.1:{port}"
        return out

    def _launch(self, fleet: FleetView) -> str:
        sidecars = self._start_sidecars(fleet)
        grpc, metrics, port, admin, decide = free_port(), free_port(), free_port(), free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        cfg = self.workdir / f"{self.slug}-picker.yaml"
        cfg.write_text(yaml.safe_dump(self.picker_config(fleet, grpc, metrics, sidecars, decide), sort_keys=False))
        picker = self._proc("picker", [sys.executable, "-m", "extproc.cli", "serve", "--config", str(cfg)])
        picker.wait_log("ext_proc on port", READY_TIMEOUT_S)
        from extproc.envoyconfig.cli import main as envoy_config

        bootstrap = self.workdir / f"{self.slug}-envoy.yaml"
        argv = ["--listen-port", str(port), "--listen-host", "127.0.0.1", "--picker", f"127.0.0.1:{grpc}",
                "--picker-decide", f"127.0.0.1:{decide}", "--admin-port", str(admin), "--out", str(bootstrap)]
        for addr in fleet.addresses:
            argv += ["--endpoint", sidecars.get(addr, addr)]
        if envoy_config(argv) != 0:
            raise RuntimeError(f"kvswitch envoy-config failed for {argv}")
        self._proc("envoy", _envoy_cmd(bootstrap))
        return f"http://127.0.0.1:{port}"


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class VllmRouter(Router):
    def __init__(self, name: str, workdir: Path, policy: str) -> None:
        super().__init__(name, workdir)
        self.policy = policy
        self.metrics_url: str | None = None  # its Prometheus port's /metrics, once launched

    def command(self, fleet: FleetView, port: int, prom: int) -> list[str]:
        cmd = [str(peersenv.tool("vllm-router")), "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-port", str(prom), "--prometheus-host", "127.0.0.1"]
        prefill = [u for u, r in zip(fleet.urls, fleet.roles) if r == "prefill"]
        decode = [u for u, r in zip(fleet.urls, fleet.roles) if r != "prefill"]
        if prefill:
            cmd += ["--vllm-pd-disaggregation"]
            for u in prefill:
                cmd += ["--prefill", u]
            for u in decode:
                cmd += ["--decode", u]
            cmd += ["--prefill-policy", self.policy, "--decode-policy", self.policy]
        else:
            cmd += ["--worker-urls", *fleet.urls, "--policy", self.policy]
        if self.policy == "kv_aware":
            for u, kv in zip(fleet.urls, fleet.kv_event_endpoints):
                cmd += ["--kv-event-source", f"{u}={kv}"]
            block = cache_block_size(fleet.urls[0] + "/metrics") or 16
            cmd += ["--kv-event-block-size", str(block), "--kv-event-model", fleet.model]
        return cmd

    def _launch(self, fleet: FleetView) -> str:
        port, prom = free_port(), free_port()
        self._proc("router", self.command(fleet, port, prom))
        self.metrics_url = f"http://127.0.0.1:{prom}/metrics"
        return f"http://127.0.0.1:{port}"

    def kv_lookups(self) -> dict[str, float]:
        """kv_aware's ``vllm_router_kv_placement_lookups_total`` by result."""
        if self.policy != "kv_aware" or self.metrics_url is None:
            return {}
        return scrape_by_label(self.metrics_url, "vllm_router_kv_placement_lookups_total", "result")


class SglangRouter(Router):
    def __init__(self, name: str, workdir: Path, policy: str) -> None:
        super().__init__(name, workdir)
        self.policy = policy

    def _launch(self, fleet: FleetView) -> str:
        if any(r == "prefill" for r in fleet.roles):
            raise ValueError("sglang-router's P/D mode speaks SGLang's bootstrap protocol, not vLLM's; "
                             "it is not run against a P/D fleet")
        port, prom = free_port(), free_port()
        cmd = [str(peersenv.tool("sglang-router")), "launch", "--host", "127.0.0.1", "--port", str(port),
               "--worker-urls", *fleet.urls, "--policy", self.policy, "--prometheus-port", str(prom),
               "--prometheus-host", "127.0.0.1"]
        self._proc("router", cmd)
        return f"http://127.0.0.1:{port}"


def make_router(name: str, workdir: Path) -> Router:
    """A router from its name (see the module docstring); unknown names raise ValueError."""
    kind, _, arg = name.partition(":")
    if kind == "kvswitch":
        profile = arg or "default"
        if profile not in KVSWITCH_PROFILES:
            raise ValueError(f"{name}: unknown kvswitch profile {profile!r} (known: {', '.join(KVSWITCH_PROFILES)})")
        return KvSwitch(name, workdir, profile)
    if kind == "envoy-rr" and not arg:
        return EnvoyRoundRobin(name, workdir)
    if kind == "vllm-router":
        if arg not in VLLM_ROUTER_POLICIES:
            raise ValueError(f"{name}: vllm-router policy must be one of {', '.join(VLLM_ROUTER_POLICIES)}")
        return VllmRouter(name, workdir, arg)
    if kind == "sglang-router":
        if arg not in SGLANG_ROUTER_POLICIES:
            raise ValueError(f"{name}: sglang-router policy must be one of {', '.join(SGLANG_ROUTER_POLICIES)}")
        return SglangRouter(name, workdir, arg)
    raise ValueError(f"unknown router {name!r}: use kvswitch[:profile], envoy-rr, vllm-router:<policy>, "
                     f"sglang-router:<policy>")
