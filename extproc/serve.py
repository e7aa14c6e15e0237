"""``kvswitch serve``: run the ext_proc endpoint picker until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import uvloop

from extproc.config import Config, ConfigError, config_from_dict, load_config, parse_endpoint_flag
from extproc.looplag import LoopLagProbe
from extproc.server import build_scheduler, build_server
from pickers.director import Director

if TYPE_CHECKING:
    from extproc.server import Server
    from pickers.planner.live import LivePlanner

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch serve", description=__doc__)
    p.add_argument("--config", help="YAML configuration file (defaults apply without one)")
    p.add_argument("--endpoint", action="append", default=[], metavar="ADDR[,role=decode,accelerator=H100,...]",
                   help="add an endpoint (repeatable)")
    p.add_argument("--port", type=int, help="gRPC port (server.grpc_port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (server.metrics_port; -1 disables)")
    p.add_argument("--decide-port", type=int, help="the ext_authz front's HTTP port (server.decide_port; default the "
                   "gRPC port + 1; -1 disables)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--health-port", type=int, help="plaintext gRPC health port for kubelet probes (server.health_port)")
    p.add_argument("--max-fallback", type=int, help="endpoints in the fallback list; 1 for ORIGINAL_DST clusters "
                   "(server.max_fallback)")
    p.add_argument("--debug-headers", action="store_true", help="add x-kvswitch-* response headers")
    p.add_argument("--response-body", choices=["access-log", "observe", "skip", "detach"],
                   help="server.response_body, matching kvswitch envoy-config --response-body: access-log "
                        "(default) routes, then learns each response's outcome from Envoy's access log (first "
                        "byte, usage, status) off the critical path; observe reads every response chunk; skip "
                        "sees headers and the stream's end; detach sees nothing of the response")
    k8s = p.add_argument_group("Kubernetes discovery (discovery.kubernetes)")
    k8s.add_argument("--pool", help="watch this InferencePool and the pods it selects (instead of endpoints)")
    k8s.add_argument("--namespace", help="the pool's namespace (default: $POD_NAMESPACE, the service account's)")
    k8s.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    tls = p.add_argument_group("TLS on the gRPC port")
    tls.add_argument("--tls-cert", help="PEM certificate chain (server.tls_cert)")
    tls.add_argument("--tls-key", help="PEM private key (server.tls_key)")
    tls.add_argument("--tls-self-signed", action="store_true",
                     help="serve TLS with a certificate made at start (server.tls_self_signed)")
    p.add_argument("--log-level", default="INFO")
    return p


def _namespace(given: str) -> str:
    if given:
        return given
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def attach_discovery(config: Config, director: Director) -> None:
    """Give the director's data layer its Kubernetes discovery when the configuration asks for one (it runs
    between the director's start and stop, like the scrapers)."""
    k = config.discovery.kubernetes
    if k is None:
        return
    from pickers.datalayer.k8s import KubernetesDiscovery, KubernetesDiscoverySettings

    if not k.pool:
        raise ConfigError("discovery.kubernetes.pool: name the InferencePool (or kvswitch serve --pool NAME)")
    director.dl.discovery = KubernetesDiscovery(KubernetesDiscoverySettings(
        pool=k.pool, namespace=_namespace(k.namespace), kubeconfig=k.kubeconfig, drain_seconds=k.drain_seconds))


def build_planner(config: Config, director: Director) -> LivePlanner | None:
    """The live planner when the configuration has a ``planner:`` section (else None): gauges always, and a
    Kubernetes target when ``planner.target.kubernetes`` names Deployments."""
    if config.planner is None:
        return None
    from pickers.planner.live import LivePlanner
    from pickers.planner.settings import planner_settings

    settings = planner_settings(config.planner)
    target = None
    k = settings.target.kubernetes
    if k is not None:
        from pickers.planner.kube import KubernetesTarget

        target = KubernetesTarget(k, _namespace(k.namespace))
    planner = LivePlanner(settings, director.dl, director.clock, target)
    director.add_observer(planner.observer)
    return planner


def freeze_startup_objects() -> None:
    """Move every object alive once the picker is up (modules, numba's and numpy's machinery, the scheduler's
    tables) out of the garbage collector's sight. A full collection scanned them all: one took 59 ms inside a
    serving picker (every request in flight waited), 1.7 ms after this. They live as long as the process, so
    nothing is lost by never scanning them; call it once, at the end of start-up."""
    gc.collect()
    gc.freeze()


async def _run(server: Server, planner: LivePlanner | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The loop thread gives the GIL up and waits for it at every I/O call; with a worker thread parsing a big
    # body, the default 5 ms switch interval turns each wait into up to 5 ms (the convoy effect). 1 ms keeps
    # health checks and small requests responsive at a small cost to the worker's throughput.
    sys.setswitchinterval(0.001)
    await server.start()
    lag = LoopLagProbe()  # kvswitch_event_loop_lag_seconds: a stalled loop vs a saturated machine
    lag.start()
    print(f"kvswitch serve: ext_proc on port {server.port}, metrics on {server.metrics_port}, ext_authz on port "
          f"{server.decide_port}", flush=True)
    if planner is not None:
        await planner.start()
        print(f"kvswitch serve: live planner on, every {planner.settings.interval_s:g}s "
              f"({'scaling ' + planner.target.describe() if planner.target else 'gauges only'})",
              flush=True)
    freeze_startup_objects()
    await stop.wait()
    if planner is not None:
        await planner.stop()
    logging.getLogger("kvswitch").info("draining (up to %.1fs)", server.config.server.drain_seconds)
    await lag.stop()
    await server.stop()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
        for value in args.endpoint:
            ep = parse_endpoint_flag(value)
            if any(e.address == ep.address for e in config.endpoints):
                raise ConfigError(f"--endpoint {ep.address} is already configured")
            config.endpoints.append(ep)
        if args.pool or args.namespace or args.kubeconfig:
            if not args.pool and config.discovery.kubernetes is None:
                raise ConfigError("--namespace/--kubeconfig need --pool (or discovery.kubernetes.pool)")
            k = config.discovery.kubernetes
            raw = msgspec.to_builtins(config)
            raw["discovery"]["kubernetes"] = {
                **(msgspec.to_builtins(k) if k is not None else {}),
                **{key: v for key, v in (("pool", args.pool), ("namespace", args.namespace),
                                         ("kubeconfig", args.kubeconfig)) if v}}
            config = config_from_dict(raw)
        if args.tls_cert or args.tls_key or args.tls_self_signed:
            raw = msgspec.to_builtins(config)
            raw["server"].update({k: v for k, v in (("tls_cert", args.tls_cert), ("tls_key", args.tls_key),
                                                     ("tls_self_signed", args.tls_self_signed)) if v})
            config = config_from_dict(raw)
        if config.discovery.kubernetes is not None and not config.discovery.kubernetes.pool:
            raise ConfigError("discovery.kubernetes.pool: name the InferencePool (or kvswitch serve --pool NAME)")
    except ConfigError as exc:
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    s = config.server
    if args.port is not None:
        s.grpc_port = args.port
    if args.metrics_port is not None:
        s.metrics_port = args.metrics_port
    if args.decide_port is not None:
        s.decide_port = args.decide_port
    if args.host:
        s.host = args.host
    if args.health_port is not None:
        s.health_port = args.health_port
    if args.max_fallback is not None:
        if args.max_fallback < 0:
            print("kvswitch serve: --max-fallback must be >= 0", file=sys.stderr)
            return 2
        s.max_fallback = args.max_fallback
    if args.debug_headers:
        s.debug_headers = True
    if args.response_body:
        s.response_body = args.response_body
    try:  # the scheduler section is validated here: a bad key is one line and exit 2, like the rest
        director = build_scheduler(config)
        attach_discovery(config, director)
        planner = build_planner(config, director)
    except ConfigError as exc:
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    uvloop.install()

    async def go() -> None:
        await _run(build_server(config, director), planner)

    try:
        asyncio.run(go())
    except (OSError, ConfigError) as exc:  # a port in use, an unreadable file: say which, without a traceback
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    return 0
