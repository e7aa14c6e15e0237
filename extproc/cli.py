"""The ``kvswitch`` command: one entry point, one subcommand per job.

Each subcommand lives with the code it drives and takes its own argv, so a subcommand's imports
(grpc, aiohttp, zmq, matplotlib...) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("extproc.serve", "main", "run the ext_proc endpoint picker that Envoy calls"),
    "envoy-config": ("extproc.envoyconfig.cli", "main", "write an Envoy bootstrap that uses the picker"),
    "up": ("extproc.stack", "main", "start Envoy + picker + a simulated fleet on loopback"),
    "demo": ("extproc.demo", "main", "run the local stack with a short workload and print a summary"),
    "sim": ("engine.sim.cli", "main", "run simulated vLLM pods (real time) or replay a trace (virtual time)"),
    "plan": ("engine.sim.cluster.plan", "main", "find the cheapest fleet for a trace under SLOs (cost model + replay)"),
    "sidecar": ("engine.sidecar.cli", "main", "run the decode pod's prefill/decode sidecar"),
    "bench": ("e2e.bench.cli", "main", "benchmarks: kvswitch against peers on a simulated fleet"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: kvswitch COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'kvswitch COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"kvswitch: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            print(f"kvswitch {name}: not available in this build ({exc.name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
