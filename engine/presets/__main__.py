"""``python -m engine.presets MODEL ACCELERATOR ROLE [--connector C]``: print a recipe as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from engine.presets.recipes import CONNECTORS, ROLES, preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.presets", description=__doc__)
    p.add_argument("model")
    p.add_argument("accelerator")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--connector", choices=CONNECTORS, default="nixl")
    p.add_argument("--model-path")
    args = p.parse_args(argv)
    try:
        r = preset(args.model, args.accelerator, args.role, args.connector, model_path=args.model_path)
    except ValueError as exc:
        p.error(str(exc))
    json.dump({"command": r.command(), "env": r.env(), "labels": r.labels(), "resources": r.resources(),
               "pods_per_engine": r.pods, "ports": r.container_ports()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
