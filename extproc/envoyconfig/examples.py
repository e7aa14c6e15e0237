"""The example bootstraps checked into envoy/ (regenerate: python -m extproc.envoyconfig.examples)."""

from __future__ import annotations

import sys
from pathlib import Path

from extproc.envoyconfig.builder import EnvoyConfigOptions, render

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
_POOL = ["10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000"]

EXAMPLES: dict[str, EnvoyConfigOptions] = {
    "envoy-override-host.yaml": EnvoyConfigOptions(endpoints=_POOL),
    # what `kvswitch envoy-config` writes by default: the picker asked over ext_authz (its decide port 9003)
    "envoy-override-host-ext-authz.yaml": EnvoyConfigOptions(endpoints=_POOL, picker_protocol="ext-authz"),
    "envoy-override-host-fail-open.yaml": EnvoyConfigOptions(endpoints=_POOL, fail_open=True),
    "envoy-original-dst.yaml": EnvoyConfigOptions(lb="original-dst"),
    # pair with `kvswitch serve --response-body skip`
    "envoy-override-host-skip-response-body.yaml": EnvoyConfigOptions(endpoints=_POOL, response_body="skip"),
}


def rendered() -> dict[str, str]:
    return {name: render(opts) for name, opts in EXAMPLES.items()}


def main() -> int:
    for name, text in rendered().items():
        (ENVOY_DIR / name).write_text(text)
        print(f"wrote envoy/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
