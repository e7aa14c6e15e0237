"""``kvswitch sidecar``: run one decode pod's sidecar until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from engine.sidecar.config import SidecarConfig
from engine.sidecar.protocol import Connector
from engine.sidecar.server import Sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvswitch sidecar",
        description="Decode-pod sidecar: runs the prefill leg named by x-prefiller-host-port on an allowed "
                    "prefill pod, then the decode leg on the local vLLM, streaming the answer back.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free)")
    p.add_argument("--decode-url", default="http://127.0.0.1:8200", help="the local vLLM engine")
    p.add_argument("--connector", choices=[c.value for c in Connector], default=Connector.NIXL.value,
                   help="nixl: pass kv_transfer_params; shared-storage: vLLM ExampleConnector, match by prompt")
    p.add_argument("--prefill-pod", action="append", default=[], metavar="HOST:PORT",
                   help="a prefill pod this sidecar may contact (repeatable)")
    p.add_argument("--prefill-pods-file", metavar="FILE",
                   help="more allowed prefill pods, one host:port per line; re-read when it changes")
    p.add_argument("--picker-secret-file", metavar="FILE",
                   help="shared secret: also accept targets signed by the picker (x-kvswitch-prefill-signature)")
    p.add_argument("--max-retries", type=int, default=2, help="prefill retries on 502/503/504/connect errors")
    p.add_argument("--retry-backoff", type=float, default=0.05, help="first retry backoff in seconds (doubles)")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="largest request body accepted")
    p.add_argument("--prefill-timeout", type=float, default=600.0, help="seconds for one prefill attempt")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    secret = None
    if args.picker_secret_file:
        secret = Path(args.picker_secret_file).read_bytes().strip()
        if not secret:
            raise ValueError(f"picker secret file {args.picker_secret_file} is empty")
    return SidecarConfig(
        decode_url=args.decode_url, host=args.host, port=args.port, connector=Connector(args.connector),
        prefill_pods=tuple(args.prefill_pod), prefill_pods_file=args.prefill_pods_file, picker_secret=secret,
        max_retries=args.max_retries, retry_backoff_s=args.retry_backoff, max_body_bytes=args.max_body_bytes,
        prefill_timeout_s=args.prefill_timeout,
    )


async def _serve(config: SidecarConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Sidecar(config) as sidecar:
        allowed = sorted(sidecar.allow_list.addresses)
        logging.getLogger("kvswitch.sidecar").info(
            "sidecar on %s -> %s (connector %s, %d allowed prefill pods%s)", sidecar.address, config.decode_url,
            config.connector.value, len(allowed), ", picker signatures accepted" if config.picker_secret else "")
        await stop.wait()


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve(config))
    except ValueError as exc:  # e.g. a bad line in the prefill pods file
        parser.error(str(exc))
    return 0
