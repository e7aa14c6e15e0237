"""``kvswitch sim``: run simulated vLLM pods in real time; ``kvswitch sim replay``: the virtual-time simulator.

    kvswitch sim --pods 4 --base-port 8100 --kv-events-base-port 5557 --time-scale 1
    kvswitch sim --config fleet.yaml
    kvswitch sim replay --help        (engine.sim.cluster.cli, when present)

Pod i listens on base-port + i and publishes KV events on kv-events-base-port + i (port 0: free ports).
Prints one line per pod, then "ready"; SIGINT/SIGTERM stop every pod cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import signal
import sys

import uvloop

from engine.sim.fleet import SimFleet, load_fleet_config, specs_from_config
from engine.sim.spec import PodSpec
from engine.tokens.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch sim", description="Run simulated vLLM pods (real time).")
    p.add_argument("--pods", type=int, default=1, help="number of pods (ignored with --config)")
    p.add_argument("--base-port", type=int, default=8100, help="HTTP port of pod 0 (0: free ports)")
    p.add_argument("--kv-events-base-port", type=int, default=5557, help="ZMQ port of pod 0 (0: free)")
    p.add_argument("--no-kv-events", action="store_true", help="do not publish KV events")
    p.add_argument("--config", help="fleet YAML file (pods, roles, accelerators, models)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="wall seconds per simulated second (default 1; 0.1 runs 10x faster)")
    p.add_argument("--tokenizer", help="path to a tokenizer.json or its folder (default: built-in)")
    p.add_argument("--model-name", default="sim-model", help="served model name")
    p.add_argument("--accelerator", default="H100")
    p.add_argument("--model-profile", default="llama-3.1-8b")
    p.add_argument("--role", default="both", choices=("both", "prefill", "decode"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per pod (default: cost model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--seed", type=int, default=None, help="base seed (pod i gets seed + i)")
    p.add_argument("--event-format", default="map", choices=("map", "array"))
    return p


def _specs(args: argparse.Namespace) -> tuple[list[PodSpec], float]:
    base = PodSpec(
        host=args.host, model_name=args.model_name, model_profile=args.model_profile,
        accelerator=args.accelerator, role=args.role, block_size=args.block_size, num_blocks=args.num_blocks,
        event_format=args.event_format,
    )
    time_scale = 1.0
    if args.config:
        cfg = load_fleet_config(args.config)
        specs = specs_from_config(cfg, base)
        if cfg.time_scale is not None:
            time_scale = cfg.time_scale
    else:
        if args.pods <= 0:
            raise ValueError("--pods must be positive")
        specs = [PodSpec(**{**_fields(base), "name": f"pod-{i}"}) for i in range(args.pods)]
    for i, s in enumerate(specs):
        s.port = args.base_port + i if args.base_port else 0
        s.kv_events_port = None if args.no_kv_events else (
            args.kv_events_base_port + i if args.kv_events_base_port else 0)
        if args.seed is not None:
            s.seed = args.seed + i
    if args.time_scale is not None:
        time_scale = args.time_scale
    if time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    return specs, time_scale


def _fields(spec: PodSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__slots__}


async def _serve(specs: list[PodSpec], time_scale: float, tokenizer_path: str | None) -> None:
    fleet = SimFleet(specs, time_scale=time_scale, tokenizer=load_tokenizer(tokenizer_path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with fleet:
        for p in fleet.pods:
            print(f"{p.name} http://{p.address} role={p.role} accelerator={p.spec.accelerator} "
                  f"model={p.spec.model_profile} kv_blocks={p.core.num_blocks} block_size={p.core.block_size} "
                  f"kv_events={p.kv_events_endpoint or '-'}", flush=True)
        print("ready", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "replay":
        try:
            mod = importlib.import_module("engine.sim.cluster.cli")
        except ModuleNotFoundError as exc:
            if exc.name and "engine.sim.cluster".startswith(exc.name):
                print("kvswitch sim replay: the virtual-time simulator (engine.sim.cluster) is not in this "
                      "build", file=sys.stderr)
                return 2
            raise
        return int(mod.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        specs, time_scale = _specs(args)
    except (ValueError, OSError) as exc:
        print(f"kvswitch sim: {exc}", file=sys.stderr)
        return 2
    try:
        uvloop.run(_serve(specs, time_scale, args.tokenizer))
    except OSError as exc:
        print(f"kvswitch sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
