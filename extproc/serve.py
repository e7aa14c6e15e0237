"""``kvswitch serve``: run the ext_proc endpoint picker until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from extproc.config import ConfigError, load_config, parse_endpoint_flag
from extproc.server import build_scheduler, build_server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch serve", description=__doc__)
    p.add_argument("--config", help="YAML configuration file (defaults apply without one)")
    p.add_argument("--endpoint", action="append", default=[], metavar="ADDR[,role=decode,accelerator=H100,...]",
                   help="add an endpoint (repeatable)")
    p.add_argument("--port", type=int, help="gRPC port (server.grpc_port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (server.metrics_port; -1 disables)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--debug-headers", action="store_true", help="add x-kvswitch-* response headers")
    p.add_argument("--response-body", choices=["observe", "skip", "detach"],
                   help="server.response_body: observe (default) reads every response chunk; skip expects Envoy "
                        "to send none (kvswitch envoy-config --response-body skip) and ends requests at stream "
                        "end; detach: "
                        "Envoy sends nothing of the response, a picker crash cuts no placed stream, no feedback")
    p.add_argument("--log-level", default="INFO")
    return p


async def _run(server) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The loop thread gives the GIL up and waits for it at every I/O call; with a worker thread parsing a big
    # body, the default 5 ms switch interval turns each wait into up to 5 ms (the convoy effect). 1 ms keeps
    # health checks and small requests responsive at a small cost to the worker's throughput.
    sys.setswitchinterval(0.001)
    await server.start()
    print(f"kvswitch serve: ext_proc on port {server.port}, metrics on {server.metrics_port}", flush=True)
    await stop.wait()
    logging.getLogger("kvswitch").info("draining (up to %.1fs)", server.config.server.drain_seconds)
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
    except ConfigError as exc:
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    s = config.server
    if args.port is not None:
        s.grpc_port = args.port
    if args.metrics_port is not None:
        s.metrics_port = args.metrics_port
    if args.host:
        s.host = args.host
    if args.debug_headers:
        s.debug_headers = True
    if args.response_body:
        s.response_body = args.response_body
    try:  # the scheduler section is validated here: a bad key is one line and exit 2, like the rest
        director = build_scheduler(config)
    except ConfigError as exc:
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    uvloop.install()

    async def go() -> None:
        await _run(build_server(config, director))

    try:
        asyncio.run(go())
    except OSError as exc:  # a port in use: say which, without a traceback
        print(f"kvswitch serve: {exc}", file=sys.stderr)
        return 2
    return 0
