"""The image recipe: wheels pinned by requirements.lock, installed from those wheels only, run as non-root,
with a health check. (The image itself is built by `make image`, not by the tests: no registry is reachable
here for a base image.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_lock_pins_every_runtime_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not pinned"
            pins[name.lower().replace("_", "-")] = version
    missing = sorted(_name(d) for d in deps if _name(d) not in pins)
    assert not missing, f"run `make lock`: not in requirements.lock: {missing}"


def test_dockerfile_installs_only_locked_wheels_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
    assert "--constraint requirements.lock" in text and "--no-index" in text and "/opt/kvswitch" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert "HEALTHCHECK" in text and "extproc.healthcheck" in text
    make = (REPO / "Makefile").read_text()
    assert "--isolation chroot" in make and "--isolation=chroot" in make
