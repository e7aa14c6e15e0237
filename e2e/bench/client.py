"""The client: aiperf replays a Mooncake trace against one base URL; its exports become a RunResult.

aiperf is the same real client for every router (streaming completions, fixed schedule from the trace's
timestamps, prompts built from hash ids with the shared tokenizer). We read its per-request export
(profile_export.jsonl) ourselves so every percentile and CDF comes from the same raw samples.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e2e.bench import peersenv
from e2e.bench.procs import Proc
from e2e.bench.tokenizer import ensure_hub_cache


@dataclass
class RunResult:
    """One router x rate x repetition: raw per-request samples plus aiperf's run totals."""

    router: str
    rate: float
    repetition: int
    ttft_ms: list[float] = field(default_factory=list)
    # per entry of ttft_ms: when that request was sent, seconds after the run's first send (empty in sets
    # recorded before it was kept)
    sent_s: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)  # per-request mean inter-token latency
    e2e_ms: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    input_tokens: list[int] = field(default_factory=list)  # per request, from the server's usage
    cached_tokens: list[int] = field(default_factory=list)  # per request: usage prompt cached tokens
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    requests_sent: int = 0
    duration_s: float = 0.0
    request_throughput: float = 0.0
    output_tok_s: float = 0.0
    hit_rate: float | None = None
    max_pod_share: float | None = None
    wall_s: float = 0.0
    pod_query_tokens: list[float] = field(default_factory=list)  # prompt tokens each pod scheduled
    engine_ttft_ms: float | None = None  # mean TTFT the pods measured themselves (simulated ms)
    router_prompts: float = 0.0  # prompts the router sent the pods itself (kvswitch's warm-up pieces)
    # the router's own KV index lookups over the run, by result (vllm-router kv_aware; Router.kv_lookups)
    router_kv_lookups: dict[str, float] = field(default_factory=dict)
    time_scale: float = 1.0  # samples are in simulated time: wall / time_scale (see to_simulated)

    def to_simulated(self, time_scale: float) -> RunResult:
        """Wall-clock samples -> simulated time (the fleet runs ``time_scale`` x slower than simulated)."""
        ts = float(time_scale)
        self.ttft_ms = [v / ts for v in self.ttft_ms]
        self.sent_s = [v / ts for v in self.sent_s]
        self.itl_ms = [v / ts for v in self.itl_ms]
        self.e2e_ms = [v / ts for v in self.e2e_ms]
        self.duration_s /= ts
        self.request_throughput *= ts
        self.output_tok_s *= ts
        self.time_scale = ts
        return self

    @property
    def cold_prompts(self) -> float:
        """Requests that found less than half their prompt cached: prefix misses the routing paid for."""
        if not self.input_tokens:
            return float("nan")
        return float(sum(1 for n, c in zip(self.input_tokens, self.cached_tokens) if n and c < n / 2))

    @property
    def late_ttft_p90(self) -> float:
        """TTFT p90 of the requests sent in the second half of the run's sends (NaN without send times).

        The first requests of a run find every cache cold: each prompt group's prefix is computed once, and the
        requests behind it wait. On a short run at the knee those first seconds hold most of the requests at or
        above the run's p90 (shared prefix at 1x, 400 requests: 30-40 of the 40, every router), so the run's p90
        measures the cold start; this one measures the fleet once it runs warm. The simulator's definition
        (imported here, not with the module: the simulator is most of a second to import)."""
        if not self.sent_s or len(self.sent_s) != len(self.ttft_ms):
            return float("nan")
        from engine.sim.cluster.report import late_p90

        return late_p90(np.asarray(self.sent_s), np.asarray(self.ttft_ms))

    @property
    def path_ms(self) -> float:
        """Mean client TTFT minus the pods' own mean TTFT: what router + proxy + client add per request."""
        if self.engine_ttft_ms is None or not self.ttft_ms:
            return float("nan")
        return float(np.mean(self.ttft_ms)) - self.engine_ttft_ms

    @property
    def ok(self) -> int:
        return len(self.e2e_ms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        return cls(**d)


def run_dir_name(router: str, rate: float, repetition: int) -> str:
    """A run's folder under a comparison's ``raw/`` (its trace, the router's logs, aiperf's exports in ``aiperf/``)."""
    return f"{router.replace(':', '-')}-r{rate:g}-rep{repetition}"


def _value(metrics: dict[str, Any], name: str) -> Any:
    m = metrics.get(name)
    return m.get("value") if isinstance(m, dict) else None


def parse_exports(artifact_dir: Path, router: str, rate: float, repetition: int) -> RunResult:
    """A RunResult from aiperf's profile_export.jsonl (per request) and profile_export_aiperf.json."""
    art = Path(artifact_dir)
    res = RunResult(router, rate, repetition)
    records = art / "profile_export.jsonl"
    started: list[float | None] = []  # per entry of ttft_ms: the request's send time (ns), where aiperf gave one
    if records.exists():
        for line in records.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            res.requests_sent += 1
            err = rec.get("error")
            metrics = rec.get("metrics") or {}
            if err:
                res.errors += 1
                kind = str(err.get("type") or err.get("code") or "error") if isinstance(err, dict) else "error"
                res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1
                continue
            latency = _value(metrics, "request_latency")
            if latency is None:
                res.errors += 1
                res.error_kinds["no-latency"] = res.error_kinds.get("no-latency", 0) + 1
                continue
            res.e2e_ms.append(float(latency))
            ttft = _value(metrics, "time_to_first_token")
            if ttft is not None:
                res.ttft_ms.append(float(ttft))
                start = (rec.get("metadata") or {}).get("request_start_ns")
                started.append(float(start) if isinstance(start, (int, float)) else None)
            itl = _value(metrics, "inter_token_latency")
            if itl is not None and not (isinstance(itl, float) and math.isnan(itl)):
                res.itl_ms.append(float(itl))
            osl = _value(metrics, "output_sequence_length")
            res.output_tokens.append(int(osl or 0))
            res.input_tokens.append(int(_value(metrics, "usage_prompt_tokens") or 0))
            res.cached_tokens.append(int(_value(metrics, "usage_prompt_cache_read_tokens") or 0))
    if started and None not in started:
        first = min(t for t in started if t is not None)
        res.sent_s = [(t - first) / 1e9 for t in started if t is not None]
    summary = art / "profile_export_aiperf.json"
    if summary.exists():
        s = json.loads(summary.read_text())

        def avg(key: str) -> float:
            v = s.get(key)
            return float(v.get("avg") or 0.0) if isinstance(v, dict) else 0.0

        res.duration_s = avg("benchmark_duration")
        res.request_throughput = avg("request_throughput")
        res.output_tok_s = avg("output_token_throughput")
    if res.duration_s and not res.request_throughput:
        res.request_throughput = res.ok / res.duration_s
        res.output_tok_s = sum(res.output_tokens) / res.duration_s
    return res


def aiperf_command(url: str, model: str, trace: Path, artifact_dir: Path, tokenizer_id: str,
                   timeout_s: float, seed: int) -> list[str]:
    return [
        str(peersenv.tool("aiperf")), "profile",
        "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming",
        "--tokenizer", tokenizer_id, "--input-file", str(trace), "--custom-dataset-type", "mooncake_trace",
        "--fixed-schedule", "--artifact-dir", str(artifact_dir), "--ui-type", "none",
        "--extra-inputs", "ignore_eos:true", "--random-seed", str(seed),
        "--request-timeout-seconds", str(int(timeout_s)), "--no-server-metrics", "--no-gpu-telemetry",
        "--workers-max", "2",
    ]


def run_aiperf(url: str, model: str, trace: Path, artifact_dir: Path, *, router: str, rate: float,
               repetition: int, timeout_s: float, seed: int = 0, cache_dir: Path | None = None) -> RunResult:
    """Replay ``trace`` against ``url`` and parse the result; raises with aiperf's log tail if it fails."""
    tokenizer_id, env = ensure_hub_cache(cache_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    cmd = aiperf_command(url, model, trace, artifact_dir, tokenizer_id, timeout_s, seed)
    proc = Proc(f"aiperf -> {router}", cmd, artifact_dir / "aiperf-stdout.log", env)
    try:
        proc.popen.wait(timeout_s + 120)
    except subprocess.TimeoutExpired:
        raise proc.fail(f"still running after {timeout_s + 120:.0f} s") from None
    finally:
        proc.stop()
    if not (artifact_dir / "profile_export_aiperf.json").exists():
        raise proc.fail(f"no profile_export_aiperf.json (exit {proc.popen.returncode})")
    return parse_exports(artifact_dir, router, rate, repetition)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
