"""``kvswitch demo``: bring up the local stack, send a short realistic workload through Envoy with the
openai SDK (streaming completions and chat; groups sharing a long system prompt; Poisson arrivals), print
what happened (latency, prefix-cache hit rate, requests per pod, the picker's counters), stop the stack.

Exit code 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvloop

from engine.tokens.tokenizer import load_tokenizer
from extproc.config import ConfigError
from extproc.localstack.report import snapshot, summarize
from extproc.localstack.workload import WorkloadSpec, build_workload, run_workload
from extproc.stack import Interrupted, add_stack_arguments, options_from_args, running_stack


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=120, help="requests to send (default 120)")
    w.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second, Poisson (default 2)")
    w.add_argument("--groups", type=int, default=8, help="groups sharing one system prompt each (default 8)")
    w.add_argument("--system-tokens", type=int, default=2048, help="system prompt length (default 2048)")
    w.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    w.add_argument("--workload-seed", type=int, default=7)
    add_stack_arguments(p, port=0)
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    for name in ("requests", "groups", "system_tokens", "concurrency"):
        if getattr(a, name) < 1:
            print(f"kvswitch demo: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if a.rate <= 0:
        print("kvswitch demo: --rate must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = options_from_args(a)
    spec = WorkloadSpec(requests=a.requests, groups=a.groups, system_tokens=a.system_tokens, rate=a.rate,
                        concurrency=a.concurrency, seed=a.workload_seed)
    try:
        tokenizer = load_tokenizer(a.tokenizer)
    except (OSError, ValueError) as exc:
        print(f"kvswitch demo: cannot load tokenizer {a.tokenizer!r}: {exc}", file=sys.stderr)
        return 2
    workload = build_workload(spec, tokenizer)
    failed = False

    async def run() -> None:
        nonlocal failed
        async with running_stack(options) as (stack, stop):
            print(stack.describe(), flush=True)
            for note in stack.notes:
                print(f"note: {note}", flush=True)
            print(f"sending {spec.requests} requests (~{spec.requests / spec.rate:.0f} s at {spec.rate:g} req/s)...",
                  flush=True)
            before = await snapshot(stack)
            task = asyncio.ensure_future(run_workload(stack.url, options.model_name, workload, progress=True))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise Interrupted
            stopper.cancel()
            task.result()
            await asyncio.sleep(0.3)  # let the pods' counters settle after the last stream
            after = await snapshot(stack)
            print(summarize(stack, workload, before, after), flush=True)
            failed = any(r.error for r in workload.results)

    uvloop.install()
    try:
        asyncio.run(run())
    except Interrupted:
        print("kvswitch demo: interrupted; stopped", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"kvswitch demo: {exc}", file=sys.stderr)
        return 2
    print("\nstack stopped.", flush=True)
    return 1 if failed else 0
