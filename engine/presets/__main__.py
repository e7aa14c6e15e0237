"""``python -m engine.presets MODEL ACCELERATOR ROLE [--connector C] [--speculative] [--multinode M]``: print a
recipe as JSON (one entry per pod of the engine group, leader first)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.presets.recipes import CONNECTORS, MULTINODE, ROLES, preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.presets", description=__doc__)
    p.add_argument("model")
    p.add_argument("accelerator")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--connector", choices=CONNECTORS, default="nixl")
    p.add_argument("--model-path")
    p.add_argument("--speculative", action="store_true", help="the model's speculative decoding (MTP, EAGLE-3, draft)")
    p.add_argument("--multinode", choices=MULTINODE, default="hybrid")
    args = p.parse_args(argv)
    try:
        r = preset(args.model, args.accelerator, args.role, args.connector, model_path=args.model_path,
                   speculative="auto" if args.speculative else None, multinode=args.multinode)
    except ValueError as exc:
        p.error(str(exc))
    pods = [{"node_rank": pod.node_rank, "role": pod.role, "command": pod.command, "env": pod.env,
             "labels": pod.labels, "resources": pod.resources, "ports": pod.ports, "dp_ranks": list(pod.ranks),
             "serves_http": pod.serves_http} for pod in r.group().pods]
    json.dump({"command": r.command(), "env": r.env(), "labels": r.labels(), "resources": r.resources(),
               "pods_per_engine": r.pods, "ports": r.container_ports(), "pods": pods}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
