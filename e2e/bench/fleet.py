"""The simulated fleet as one subprocess (``python -m engine.sim``), restarted for fresh caches.

A restart is the simplest way to give every router the same cold start: caches empty, counters at zero,
no queued work. The fleet also reports its prefix-cache counters so a run can compute its hit rate.
"""

from __future__ import annotations

import math
import re
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from e2e.bench.procs import Proc, StartError, free_port_range
from e2e.support.ports import port_clash

VLLM_DEFAULT_KV_TOPIC = ""  # vLLM's KVEventsConfig.topic default


@dataclass(slots=True)
class FleetCounters:
    """The pods' own counters at one moment (``SimFleetProcess.counters``).

    ``prefix``: per pod, (prefix_cache_hits_total, prefix_cache_queries_total) in tokens. ``ttft``: the fleet's
    totals of the engines' TTFT histogram, (sum in simulated seconds, count). The engine's TTFT starts when the
    request reaches the pod, so client TTFT minus engine TTFT is what the path in front of the pods (router,
    proxy, client) adds; the engine part holds queueing and prefill, i.e. what routing decides.
    """

    prefix: dict[str, tuple[float, float]]
    ttft: tuple[float, float]


@dataclass
class FleetSpec:
    """What the sim should run; every pod the same unless ``roles`` says otherwise (P/D)."""

    pods: int = 2
    time_scale: float = 1.0
    tokenizer: Path | None = None
    model_profile: str = "llama-3.1-8b"
    accelerator: str = "H100"
    roles: list[str] | None = None  # per pod: both | prefill | decode; None: all "both"
    seed: int = 0  # pod i hashes with seed + i (reproducible runs)
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable


def _samples(url: str, timeout: float) -> Iterator[Sample]:
    """Every sample on a /metrics page: prometheus_client's own text parser, off the request path."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        yield from family.samples


def scrape(url: str, timeout: float = 5.0, prefix: str = "vllm:") -> dict[str, float]:
    """Sum of each ``prefix``* sample over its labels (one pod's /metrics, or a router's), NaN left out; a few
    pages per run."""
    out: dict[str, float] = {}
    for sample in _samples(url, timeout):
        if sample.name.startswith(prefix) and not math.isnan(sample.value):
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def scrape_by_label(url: str, sample: str, label: str, timeout: float = 5.0) -> dict[str, float]:
    """The value of each ``sample`` series on a /metrics page, keyed by its ``label`` (summed over the rest)."""
    out: dict[str, float] = {}
    for s in _samples(url, timeout):
        if s.name == sample and label in s.labels:
            out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def cache_block_size(url: str) -> int | None:
    """The pod's KV block size from ``vllm:cache_config_info{block_size=...}``."""
    with urllib.request.urlopen(url, timeout=5) as r:
        m = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', r.read().decode())
    return int(m.group(1)) if m else None


class SimFleetProcess:
    """``python -m engine.sim --pods N ...`` on consecutive free ports, restartable."""

    def __init__(self, spec: FleetSpec, log_dir: Path) -> None:
        self.spec, self.log_dir = spec, Path(log_dir)
        self.proc: Proc | None = None
        self.base_port = self.kv_base_port = 0
        self.starts = 0
        self.model = "sim-model"

    @property
    def addresses(self) -> list[str]:
        """host:port of each pod."""
        return [f"127.0.0.1:{self.base_port + i}" for i in range(self.spec.pods)]

    @property
    def urls(self) -> list[str]:
        return [f"http://{a}" for a in self.addresses]

    @property
    def kv_event_endpoints(self) -> list[str]:
        return [f"tcp://127.0.0.1:{self.kv_base_port + i}" for i in range(self.spec.pods)]

    @property
    def tokenizer(self) -> Path | None:
        return self.spec.tokenizer

    @property
    def time_scale(self) -> float:
        """Wall seconds per simulated second of the running pods."""
        return self.spec.time_scale

    @property
    def accelerator(self) -> str:
        return self.spec.accelerator

    @property
    def model_profile(self) -> str:
        return self.spec.model_profile

    @property
    def roles(self) -> list[str]:
        return list(self.spec.roles or ["both"] * self.spec.pods)

    def command(self) -> list[str]:
        s = self.spec
        cmd = [s.python, "-m", "engine.sim", "--pods", str(s.pods), "--base-port", str(self.base_port),
               "--kv-events-base-port", str(self.kv_base_port), "--time-scale", str(s.time_scale),
               "--model-profile", s.model_profile, "--accelerator", s.accelerator, "--seed", str(s.seed)]
        if s.tokenizer:
            cmd += ["--tokenizer", str(s.tokenizer)]
        cmd += ["--config", str(self._write_fleet_config())]
        return cmd + list(s.extra_args)

    def _write_fleet_config(self) -> Path:
        """A fleet YAML with one group per run of equal roles, in pod order (pod i keeps port base+i).

        Every pod publishes KV events on vLLM's default topic (the empty string; vLLM's
        ``KVEventsConfig.topic``): vllm-router's kv_aware only takes events published there, and a
        subscriber to "" (kvswitch's default) takes every topic.
        """
        groups: list[dict] = []
        for role in self.roles:
            if groups and groups[-1]["role"] == role:
                groups[-1]["count"] += 1
            else:
                groups.append({"count": 1, "role": role, "name": f"{role}{len(groups)}"})
        path = self.log_dir / "fleet.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"pods": groups, "time_scale": self.spec.time_scale,
                                        "defaults": {"kv_events_topic": VLLM_DEFAULT_KV_TOPIC}}))
        return path

    START_ATTEMPTS = 3

    def start(self, timeout: float = 60.0) -> None:
        """Start the fleet on free ports. The ports are free when picked and bound only once the fleet runs, so
        another process may take one in between: such a start exits with EADDRINUSE and is made again on fresh
        ports, at most ``START_ATTEMPTS`` times in all; any other failure is raised at once."""
        for attempt in range(1, self.START_ATTEMPTS + 1):
            self.base_port = free_port_range(self.spec.pods)
            self.kv_base_port = free_port_range(self.spec.pods)
            self.starts += 1
            self.proc = Proc("sim fleet", self.command(), self.log_dir / f"fleet-{self.starts}.log")
            try:
                self.proc.wait_log("ready", timeout)
                for url in self.urls:
                    self.proc.wait_http(url + "/v1/models", timeout)
                break
            except StartError as exc:
                self.stop()
                if attempt == self.START_ATTEMPTS or not port_clash(str(exc)):
                    raise
        import json

        with urllib.request.urlopen(self.urls[0] + "/v1/models", timeout=5) as r:
            data = json.loads(r.read()).get("data") or [{}]
        self.model = data[0].get("id", self.model)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def restart(self, timeout: float = 60.0) -> None:
        """Fresh caches and counters. Ports change: routers must be (re)started after this."""
        self.stop()
        self.start(timeout)

    def counters(self) -> FleetCounters:
        """One scrape of every pod: the prefix-cache counters per pod and the fleet's TTFT histogram totals."""
        prefix = {}
        total = count = 0.0
        for addr, url in zip(self.addresses, self.urls):
            m = scrape(url + "/metrics")
            prefix[addr] = (m.get("vllm:prefix_cache_hits_total", 0.0), m.get("vllm:prefix_cache_queries_total", 0.0))
            total += m.get("vllm:time_to_first_token_seconds_sum", 0.0)
            count += m.get("vllm:time_to_first_token_seconds_count", 0.0)
        return FleetCounters(prefix, (total, count))

    def __enter__(self) -> SimFleetProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def hit_rate(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Fleet prefix hit rate between two scrapes, plus per-pod query share (how evenly load spread)."""
    hits = sum(after[a][0] - before.get(a, (0.0, 0.0))[0] for a in after)
    queries = {a: after[a][1] - before.get(a, (0.0, 0.0))[1] for a in after}
    total = sum(queries.values())
    out = {"hit_rate": hits / total if total > 0 else 0.0, "query_tokens": total}
    out["max_pod_share"] = max(queries.values()) / total if total > 0 else 0.0
    out["pod_query_tokens"] = list(queries.values())  # per pod, fleet order: where prefill work ran
    return out
