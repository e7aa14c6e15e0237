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


def test_dockerfile_compiles_the_numba_loops_into_a_cache_the_picker_user_can_write(tmp_path):
    """The image compiles the compiled loops at build time (else every picker start compiles ~3 s): the command it
    runs must work against this tree, and the runtime user owns the cache (numba recompiles there on another CPU)."""
    import os
    import subprocess
    import sys

    text = (REPO / "Dockerfile").read_text()
    (cmd,) = re.findall(r'^RUN /opt/kvswitch/bin/python -c "([^"]+)"', text, re.M)
    assert "warm_up()" in cmd
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", cmd], cwd=REPO, env=env, check=True, timeout=300)
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*")), "the warm-up left no numba cache index"
    assert text.count("NUMBA_CACHE_DIR=/opt/kvswitch/numba-cache") == 2  # build stage and runtime stage
    assert "--chown=10001:10001 /opt/kvswitch/numba-cache" in text
