"""``kvswitch up``: a simulated vLLM fleet, the picker and Envoy on loopback, until Ctrl-C or SIGTERM.

The Python API is ``extproc.localstack.LocalStack`` (re-exported here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable

import uvloop

from extproc.config import ConfigError
from extproc.localstack import LocalStack, StackOptions, StackPod

__all__ = ["LocalStack", "StackOptions", "StackPod", "add_stack_arguments", "main",
           "options_from_args", "running_stack"]


def _pd(value: str) -> tuple[int, int]:
    p, sep, d = value.partition(":")
    if not sep or not p.isdigit() or not d.isdigit() or int(p) < 1 or int(d) < 1:
        raise argparse.ArgumentTypeError(f"expected P:D with P, D >= 1 (e.g. 1:2), got {value!r}")
    return int(p), int(d)


def _positive(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return v


def add_stack_arguments(p: argparse.ArgumentParser, pods: int = 4, port: int = 8080,
                        time_scale: float = 1.0) -> None:
    """The stack's flags, shared by ``up`` and ``demo``."""
    g = p.add_argument_group("stack")
    g.add_argument("--pods", type=int, default=pods, help=f"simulated pods (default {pods})")
    g.add_argument("--pickers", type=int, default=1,
                   help="picker replicas behind Envoy, each health-checked and subscribed to every pod (default 1)")
    g.add_argument("--picker-protocol", choices=["ext-authz", "ext-proc"], default="ext-authz",
                   help="how Envoy asks the picker: ext-authz (default; one HTTP request per request, the body not "
                        "echoed; falls back to ext-proc when the picker config has TLS or model_rewrite) or ext-proc "
                        "(a gRPC stream per request, the Gateway API Inference Extension's protocol)")
    g.add_argument("--dp", type=int, default=1,
                   help="data-parallel ranks per pod (vLLM --data-parallel-size; the picker routes to (pod, rank))")
    g.add_argument("--pd", type=_pd, metavar="P:D",
                   help="P prefill pods and D decode pods, each decode pod behind a sidecar (instead of --pods)")
    g.add_argument("--fleet", metavar="FILE", help="engine.sim fleet YAML (instead of --pods/--pd)")
    g.add_argument("--port", type=int, default=port, help=f"Envoy listener port (default {port}; 0 = free port)")
    g.add_argument("--time-scale", type=_positive, default=time_scale,
                   help=f"simulated seconds per wall second is 1/X; below 1 runs faster than real time "
                        f"(default {time_scale:g})")
    g.add_argument("--accelerator", default="H100", help="pods' accelerator for the cost model (default H100)")
    g.add_argument("--model-profile", default="llama-3.1-8b", help="cost-model profile (default llama-3.1-8b)")
    g.add_argument("--model-name", default="sim-model", help="served model name (default sim-model)")
    g.add_argument("--profile", help="picker profile (default, precise, approximate, load-only, round-robin, ...)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its folder (default: 4 bytes per token)")
    g.add_argument("--config", metavar="FILE", help="picker YAML (server and scheduler sections)")
    g.add_argument("--no-debug-headers", dest="debug_headers", action="store_false",
                   help="leave out the x-kvswitch-* response headers")
    g.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)")
    g.add_argument("--seed", type=int, help="pods' hash seed (default random, like vLLM)")
    g.add_argument("--log-level", default="WARNING", help="Python log level (default WARNING)")


def options_from_args(a: argparse.Namespace) -> StackOptions:
    if a.pickers < 1:
        raise ConfigError(f"--pickers must be at least 1, got {a.pickers}")
    return StackOptions(pods=a.pods, pickers=a.pickers, pd=a.pd, fleet_file=a.fleet, port=a.port,
                        time_scale=a.time_scale,
                        accelerator=a.accelerator, model_profile=a.model_profile, model_name=a.model_name,
                        profile=a.profile, tokenizer=a.tokenizer, config_file=a.config,
                        debug_headers=a.debug_headers, envoy_concurrency=a.envoy_concurrency, seed=a.seed,
                        dp=a.dp, picker_log_level=a.log_level.upper(), picker_protocol=a.picker_protocol)


def describe_pods(stack: LocalStack) -> list[str]:
    lines = []
    for p in stack.pods:
        via = f" via sidecar {p.address}" if p.address != p.engine_address else ""
        kv = ",".join(p.rank_kv_events) if p.rank_kv_events else p.kv_events
        lines.append(f"  {p.name:<12} {p.role:<8} {p.engine_address}{via}  kv-events {kv or '-'}")
    return lines


@contextlib.asynccontextmanager
async def running_stack(options: StackOptions, on_stop: Callable[[], None] | None = None
                        ) -> AsyncIterator[tuple[LocalStack, asyncio.Event]]:
    """Start the stack with SIGINT/SIGTERM set to an Event (also while starting); always stop it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = LocalStack(options)
    try:
        starting = asyncio.ensure_future(stack.start())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            raise Interrupted
        stopper.cancel()
        starting.result()
        yield stack, stop
    finally:
        if on_stop is not None:
            on_stop()
        await stack.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class Interrupted(Exception):
    """A signal arrived before the stack was up."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvswitch up", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = options_from_args(a)

    async def run() -> None:
        async with running_stack(options, lambda: print("kvswitch: stopping...", flush=True)) as (stack, stop):
            print(stack.describe(), flush=True)
            for line in describe_pods(stack):
                print(line)
            for note in stack.notes:
                print(f"note: {note}")
            if stack.planner is not None:
                ps = stack.planner.settings
                print(f"planner: on, every {ps.interval_s:g}s, {stack.planner.model} on "
                      f"{','.join(stack.planner.catalogue.kinds)}, {ps.min_replicas}-{ps.max_replicas} pods; "
                      f"gauges kvswitch_planner_* on the picker's /metrics", flush=True)
            if stack.pd_handler:
                print(f"picker: prefill/decode handler {stack.pd_handler!r}")
            body = f'{{"model": "{options.model_name}", "prompt": "hello", "max_tokens": 8}}'
            print(f"try: curl -s {stack.url}/completions -H 'content-type: application/json' -d '{body}' -i",
                  flush=True)
            print("Ctrl-C to stop", flush=True)
            await stop.wait()

    uvloop.install()
    try:
        asyncio.run(run())
    except Interrupted:
        print("kvswitch up: interrupted while starting; stopped", file=sys.stderr)
        return 0
    except (ConfigError, ValueError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"kvswitch up: {exc}", file=sys.stderr)
        return 2
    print("kvswitch: stopped", flush=True)
    return 0
