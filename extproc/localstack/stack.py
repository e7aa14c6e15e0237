"""LocalStack: a simulated fleet, the picker and Envoy on loopback, started and stopped together.

    async with LocalStack(StackOptions(pods=4)) as stack:
        stack.url          # "http://127.0.0.1:8080/v1", what an OpenAI client uses as base_url
        stack.pods         # [StackPod(name, role, address, engine_address, kv_events, metrics_url)]
    # or: stack = LocalStack(opts); await stack.start(); ...; await stack.stop()

Everything runs in this process except Envoy (a child process in its own process group). Ports are
free ones picked at start, except Envoy's listener (``port``, 8080 by default; 0 picks a free one).

With a ``planner:`` section in the picker YAML (``--config``) the live planner runs in the picker and scales
this fleet itself (``extproc.localstack.scaling.LocalFleetTarget``): pods of role both are started and, drain
first, stopped at run time; Envoy then reaches pods through an ORIGINAL_DST cluster (one destination per
decision, ``server.max_fallback`` 1), since its pod list is no longer fixed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import socket
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp

from engine.sidecar import SidecarConfig
from engine.sidecar.server import Sidecar
from engine.sim.fleet import SimFleet, load_fleet_config, specs_from_config
from engine.sim.server import SimPod
from engine.sim.spec import PodSpec
from engine.tokens.tokenizer import load_tokenizer
from extproc.config import Config, ConfigError, EndpointConfig, load_config
from extproc.contextcap import context_cap_bytes
from extproc.envoyconfig.builder import EnvoyConfigOptions
from extproc.localstack.envoy import EnvoyChild
from extproc.localstack.pickerproc import PickerProcess
from extproc.localstack.ports import free_port
from extproc.server import Server, build_scheduler, build_server
from pickers.director import Director
from pickers.planner.live import LivePlanner
from pickers.planner.settings import planner_settings

log = logging.getLogger("kvswitch.up")

# Handler type names a prefill/decode handler may be registered under in pickers/ (first match wins).


@dataclass
class StackOptions:
    """What ``kvswitch up`` starts; every field has a default that works on a laptop."""

    pods: int = 4
    # Picker replicas behind the one Envoy (each health-checked, each subscribed to every pod). One runs in this
    # process (``LocalStack.server``); more than one run as separate ``kvswitch serve`` processes.
    pickers: int = 1
    pd: tuple[int, int] | None = None  # (prefill pods, decode pods): P/D with a sidecar per decode pod
    fleet_file: str | None = None  # engine.sim fleet YAML instead of pods/pd
    port: int = 8080  # Envoy listener; 0 = a free port
    time_scale: float = 1.0
    accelerator: str = "H100"
    model_profile: str = "llama-3.1-8b"
    model_name: str = "sim-model"
    profile: str | None = None  # picker profile (scheduler.profile)
    tokenizer: str | None = None  # tokenizer.json (or its folder) for the pods and the picker
    config_file: str | None = None  # picker YAML (server/scheduler sections; endpoints come from the fleet)
    debug_headers: bool = True
    envoy_concurrency: int = 1
    envoy_log_level: str = "warning"
    seed: int | None = None
    ready_timeout_s: float = 30.0
    picker_log_level: str = "WARNING"  # replica processes' log level (their logs are in the work directory)
    dp: int = 1  # data-parallel ranks per pod (vLLM --data-parallel-size): one picker endpoint per rank
    # How Envoy asks the picker (extproc.envoyconfig.builder.EnvoyConfigOptions.picker_protocol): ext-authz unless
    # the pickers have no decide port (TLS or model_rewrite in their config), then ext-proc.
    picker_protocol: str = "ext-authz"


@dataclass
class StackPod:
    """One routable pod as the picker sees it (for P/D decode pods: the sidecar in front)."""

    name: str
    role: Literal["prefill", "decode", "both"]
    address: str  # what the picker routes to and x-kvswitch-endpoint names
    engine_address: str  # the simulated engine itself (== address unless a sidecar fronts it)
    kv_events: str | None
    metrics_url: str  # the engine's /metrics
    rank_kv_events: list[str] = field(default_factory=list)  # data-parallel pods: each rank's publisher


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise OSError(f"port {port} is in use ({exc.strerror}); pick another with --port") from None


@dataclass
class _Started:
    """What has been started so far, so stop() undoes exactly that."""

    fleet: SimFleet | None = None
    sidecars: list[Sidecar] = field(default_factory=list)
    server: Server | None = None  # the picker, in this process (``pickers`` == 1)
    processes: list[PickerProcess] = field(default_factory=list)  # the replicas (``pickers`` > 1), one process each
    envoy: EnvoyChild | None = None


class LocalStack:
    """Fleet + picker + Envoy on loopback. ``start()`` returns once GET /v1/models works through Envoy."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.pods: list[StackPod] = []
        self.notes: list[str] = []  # things a person should know (e.g. P/D running decode-only)
        self.pd_handler: str | None = None
        self.config: Config | None = None
        self.workdir: Path | None = None
        self.port = 0
        self.planner: LivePlanner | None = None  # with a planner: section in the picker YAML
        self._s = _Started()
        self._stopped = False

    # ---- addresses ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def fleet(self) -> SimFleet:
        assert self._s.fleet is not None, "stack not started"
        return self._s.fleet

    @property
    def sidecars(self) -> list[Sidecar]:
        return list(self._s.sidecars)

    @property
    def server(self) -> Server:
        """The in-process picker (a stack with one picker; replicas run as processes: ``picker_processes``)."""
        assert self._s.server is not None, "stack not started, or its pickers run as processes (--pickers > 1)"
        return self._s.server

    @property
    def envoy(self) -> EnvoyChild:
        assert self._s.envoy is not None, "stack not started"
        return self._s.envoy

    @property
    def picker_processes(self) -> list[PickerProcess]:
        """The picker replicas' processes (empty with one picker, which runs in this process)."""
        return list(self._s.processes)

    @property
    def picker_addresses(self) -> list[str]:
        """Every picker's gRPC address, the one Envoy prefers first."""
        if self._s.processes:
            return [p.address for p in self._s.processes]
        return [self.server.address]

    @property
    def picker_decide_addresses(self) -> list[str]:
        """Every picker's ext_authz address (extproc/authz.py), in the order of ``picker_addresses``; empty when
        any replica has none."""
        ports = [p.decide_port for p in self._s.processes] if self._s.processes else [self.server.decide_port]
        if any(port is None for port in ports):
            return []
        return [f"127.0.0.1:{port}" for port in ports]

    @property
    def picker_address(self) -> str:
        return self.picker_addresses[0]

    @property
    def picker_metrics_url(self) -> str | None:
        """The first picker's metrics (each replica process serves its own)."""
        port = self._s.processes[0].metrics_port if self._s.processes else self.server.metrics_port
        return f"http://127.0.0.1:{port}/metrics" if port else None

    @property
    def admin_url(self) -> str:
        return self.envoy.admin_url

    def describe(self) -> str:
        """The one line ``kvswitch up`` prints once the stack answers."""
        o = self.options
        roles: dict[str, int] = {}
        for p in self.pods:
            roles[p.role] = roles.get(p.role, 0) + 1
        shape = ", ".join(f"{n} {r}" for r, n in roles.items()) if o.pd or o.fleet_file else f"{len(self.pods)}"
        if o.dp > 1:
            shape += f" x DP{o.dp}"
        metrics = f", metrics {self.picker_metrics_url}" if self.picker_metrics_url else ""
        asked = f" asked over {self.envoy.opts.picker_protocol}" if self._s.envoy is not None else ""
        return (f"kvswitch is up: {self.url}  ({shape} pods {o.model_profile} on {o.accelerator}, "
                f"time scale {o.time_scale:g}; picker {', '.join(self.picker_addresses)}{asked}{metrics}; "
                f"envoy admin {self.admin_url})")

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        if o.time_scale <= 0:
            raise ValueError("time scale must be positive")
        self.port = o.port or free_port()
        _check_port_free(self.port)
        self.config = self._picker_config()  # before anything starts: a bad file changes nothing
        self.workdir = Path(tempfile.mkdtemp(prefix="kvswitch-up-"))
        try:
            await self._start_fleet()
            await self._start_picker()
            await self._start_envoy()
            await self._wait_models()
            await self._start_planner()
        except BaseException:
            await self.stop()
            raise

    def _picker_config(self) -> Config:
        o = self.options
        cfg = load_config(o.config_file)
        if cfg.endpoints:
            raise ConfigError(f"{o.config_file}: endpoints: `kvswitch up` routes to its own simulated pods; "
                              "remove the endpoints section (use --fleet for another fleet shape)")
        s = cfg.server
        s.host, s.grpc_port, s.metrics_port = "127.0.0.1", 0, 0
        s.debug_headers = s.debug_headers or o.debug_headers
        s.drain_seconds = min(s.drain_seconds, 1.0)
        sched: dict[str, Any] = dict(cfg.scheduler or {})
        if o.profile:
            sched["profile"] = o.profile
        if o.tokenizer:
            sched["tokenizer"] = {**(sched.get("tokenizer") or {}), "path": o.tokenizer}
        if o.time_scale != 1.0:  # the pods run time_scale x slower than their profile: predict their wall steps
            predictor = dict(sched.get("predictor") or {})
            predictor.setdefault("time_scale", o.time_scale)  # a config file that sets it knows better
            sched["predictor"] = predictor
        cfg.scheduler = sched
        if cfg.planner is not None:
            if o.pickers > 1:
                raise ConfigError("planner: the live planner drains pods in its own picker; run it with --pickers 1")
            if cfg.planner.get("target"):
                raise ConfigError("planner.target: `kvswitch up` scales its own simulated fleet; remove target")
            s.max_fallback = 1  # ORIGINAL_DST: Envoy goes to the one pod the picker names
        return cfg

    def _specs(self) -> list[PodSpec]:
        o = self.options
        if o.dp < 1:
            raise ValueError("--dp must be at least 1")
        if o.dp > 1 and o.pd:
            raise ValueError("--dp with --pd is not supported: data-parallel pods serve both roles here")
        base = PodSpec(model_name=o.model_name, model_profile=o.model_profile, accelerator=o.accelerator,
                       seed=o.seed, dp_size=o.dp)
        if o.fleet_file:
            return specs_from_config(load_fleet_config(o.fleet_file), base)
        if o.pd:
            p, d = o.pd
            if p < 1 or d < 1:
                raise ValueError("--pd P:D needs at least one prefill and one decode pod")
            return ([replace(base, name=f"prefill-{i}", role="prefill") for i in range(p)]
                    + [replace(base, name=f"decode-{i}", role="decode") for i in range(d)])
        if o.pods < 1:
            raise ValueError("--pods must be at least 1")
        return [replace(base, name=f"pod-{i}") for i in range(o.pods)]

    async def _start_fleet(self) -> None:
        o = self.options
        tokenizer = load_tokenizer(o.tokenizer) if o.tokenizer else None
        self._s.fleet = fleet = SimFleet(self._specs(), time_scale=o.time_scale, tokenizer=tokenizer)
        await fleet.start()
        prefill = [p.address for p in fleet.by_role("prefill")]
        decode = fleet.by_role("decode")
        for pod in fleet.pods:
            engine = pod.address
            address = engine
            if pod.role == "decode" and prefill:
                sidecar = Sidecar(SidecarConfig(decode_url=f"http://{engine}", host="127.0.0.1", port=0,
                                                prefill_pods=tuple(prefill)))
                await sidecar.start()
                self._s.sidecars.append(sidecar)
                address = sidecar.address
            role = cast(Literal["prefill", "decode", "both"], pod.role)  # PodSpec roles are validated
            self.pods.append(StackPod(pod.name, role, address, engine, pod.kv_events_endpoint,
                                      f"http://{engine}/metrics",
                                      pod.kv_events_endpoints if pod.dp_size > 1 else []))
        if decode and not prefill:
            self.notes.append("decode pods without prefill pods: no sidecars, requests decode locally")

    async def _start_planner(self) -> None:
        cfg = self.config
        if cfg is None or cfg.planner is None:
            return
        from extproc.localstack.scaling import LocalFleetTarget

        settings = planner_settings(cfg.planner)
        settings.time_scale = self.options.time_scale  # the pods' own time
        director = self.server.scheduler
        assert isinstance(director, Director)
        target = LocalFleetTarget(self, startup_s=min(settings.startup_s, 600.0))
        self.planner = LivePlanner(settings, director.dl, director.clock, target)
        director.add_observer(self.planner.observer)
        await self.planner.start()

    def add_pod(self, pod: SimPod) -> None:
        """A pod started at run time (the planner's target): into the fleet and the picker's table."""
        self.fleet.pods.append(pod)
        role = cast(Literal["prefill", "decode", "both"], pod.role)
        sp = StackPod(pod.name, role, pod.address, pod.address, pod.kv_events_endpoint,
                      f"http://{pod.address}/metrics", pod.kv_events_endpoints if pod.dp_size > 1 else [])
        self.pods.append(sp)
        director = self.server.scheduler
        assert isinstance(director, Director)
        for ec in self._endpoint_configs([sp]):
            for ep in ec.to_endpoints():
                director.add_endpoint(ep)

    async def remove_pod(self, address: str) -> None:
        """Stop the pod at ``address`` (the planner drained it first) and forget it; its endpoints leave the
        picker's table."""
        sp = next((p for p in self.pods if p.address == address), None)
        if sp is None:
            raise KeyError(f"no pod at {address}")
        pod = self.fleet[sp.name]
        table = self.server.scheduler.dl.endpoints if isinstance(self.server.scheduler, Director) else None
        if table is not None:
            for slot in list(table.pod_slots(address)):
                ep = table.endpoints[slot]
                if ep is not None:
                    table.remove(ep.id)
            table.unhold(address)
        await pod.stop()
        self.fleet.pods.remove(pod)
        self.pods.remove(sp)

    def _endpoint_configs(self, pods: list[StackPod] | None = None) -> list[EndpointConfig]:
        eps = []
        for p in self.pods if pods is None else pods:
            spec = self.fleet[p.name].spec
            common = dict(address=p.address, role=p.role, accelerator=spec.accelerator,
                          model_profile=spec.model_profile, metrics_url=p.metrics_url,
                          labels={"kvswitch.local/pod": p.name},
                          max_num_batched_tokens=spec.max_num_batched_tokens)
            if p.rank_kv_events:  # one endpoint per data-parallel rank, each with its own KV-event publisher
                for rank, kv in enumerate(p.rank_kv_events):
                    eps.append(EndpointConfig(**common, kv_events=kv, dp_rank=rank,  # type: ignore[arg-type]
                                              dp_size=len(p.rank_kv_events)))
            else:
                eps.append(EndpointConfig(**common, kv_events=p.kv_events))  # type: ignore[arg-type]
        return eps

    async def _start_picker(self) -> None:
        cfg = self.config
        assert cfg is not None
        has_prefill = any(p.role == "prefill" for p in self.pods)
        cfg.endpoints = self._endpoint_configs()
        if has_prefill:
            if "handler" not in (cfg.scheduler or {}):
                # the threshold decider: on a quiet local fleet the SLO-aware one (the handler's default) keeps
                # every prompt on its decode pod (a leg is slower there), and the stack is to show P/D legs
                cfg.scheduler = {**(cfg.scheduler or {}), "handler": {"type": "prefill-decode",
                                                                      "decider": "threshold"}}
            handler = (cfg.scheduler or {})["handler"]
            self.pd_handler = handler if isinstance(handler, str) else str(handler.get("type", "")) or None
        if self.options.pickers <= 1:
            scheduler = build_scheduler(cfg)
            self._s.server = server = build_server(cfg, scheduler)
            await server.start()
            return
        # Each replica is a whole picker in its own process (its own loop, GIL, director and data layer),
        # scraping every pod and subscribed to every pod's KV events (so the precise index is the same on all);
        # its in-flight view is its own decisions plus the pods' scraped queues (see README, "Picker replicas").
        assert self.workdir is not None
        rcfg = copy.deepcopy(cfg)
        rcfg.server.health_port = -1  # one fixed kubelet port cannot serve N processes
        procs = [PickerProcess(rcfg, self.workdir, f"picker-{i}", self.options.picker_log_level)
                 for i in range(self.options.pickers)]
        self._s.processes.extend(procs)
        await asyncio.gather(*(p.start(self.options.ready_timeout_s) for p in procs))

    async def _start_envoy(self) -> None:
        o = self.options
        assert self.workdir is not None
        addresses = self.picker_addresses
        response_body = self.config.server.response_body if self.config else "access-log"
        decide = self.picker_decide_addresses \
            if o.picker_protocol == "ext-authz" and response_body in ("access-log", "detach") else []
        planned = self.config is not None and self.config.planner is not None
        opts = EnvoyConfigOptions(listen_port=self.port, listen_host="127.0.0.1", picker=addresses[0],
                                  pickers=addresses[1:], lb="original-dst" if planned else "override-host",
                                  fail_open=False, admin_port=free_port(),
                                  endpoints=[p.address for p in self.pods],
                                  response_body=response_body, max_body_bytes=self._context_cap(),
                                  picker_protocol="ext-authz" if decide else "ext-proc", picker_decide=decide)
        self._s.envoy = envoy = EnvoyChild(opts, self.workdir, o.envoy_concurrency, o.envoy_log_level)
        # the admin port is picked here, the listen port too unless the operator named it (--port); a picked
        # one another process took first is picked again, and the stack's URL follows it
        picked = ("admin_port",) if o.port else ("admin_port", "listen_port")
        await envoy.start(o.ready_timeout_s, repick=picked)
        self.port = opts.listen_port

    def _context_cap(self) -> int | None:
        """The picker's context cap (extproc.contextcap), enforced by Envoy too for bodies with a content-length."""
        if self.config is None:
            return None
        return context_cap_bytes(self.config.server.context_cap_bytes, {e.model_profile for e in self.config.endpoints})

    async def _wait_models(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout_s
        last = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while True:
                try:
                    async with s.get(f"{self.url}/models") as r:
                        if r.status == 200:
                            return
                        last = f"HTTP {r.status}: {(await r.text())[:200]}"
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last = repr(exc)
                if loop.time() > deadline:
                    raise TimeoutError(f"GET {self.url}/models never answered 200 ({last})\n"
                                       f"{self.envoy.log_tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Envoy first (no new requests), then the picker, sidecars and pods; removes the temp dir. Idempotent."""
        s, self._s = self._s, _Started()
        planner, self.planner = self.planner, None
        if planner is not None:
            await _quietly(planner.stop())
        if s.envoy is not None:
            await _quietly(s.envoy.stop())
        if s.processes:
            await asyncio.gather(*(_quietly(p.stop()) for p in s.processes))
        if s.server is not None:
            await _quietly(s.server.stop(0.5))
        for sc in s.sidecars:
            await _quietly(sc.stop())
        if s.fleet is not None:
            await _quietly(s.fleet.stop())
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _quietly(coro: Any) -> None:
    """Stopping one part must not keep the others running."""
    try:
        await coro
    except Exception:  # noqa: BLE001
        log.warning("error while stopping", exc_info=True)
