"""Where the peers (vllm-router, sglang-router) and the client (aiperf) live, and their versions.

They sit in their own virtual environment (.venv-bench): aiperf pins older orjson, pyzmq,
prometheus-client, pillow and huggingface-hub than kvswitch's .venv uses. See e2e/bench/README.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "KVSWITCH_BENCH_VENV"
PEER_PACKAGES = ("vllm-router", "sglang-router", "aiperf")
RECIPE = (
    "python3 -m venv .venv-bench && .venv-bench/bin/pip install --upgrade pip && "
    ".venv-bench/bin/pip install vllm-router==0.1.17 sglang-router==0.3.2 aiperf==0.13.0"
)


def bench_venv() -> Path:
    return Path(os.environ.get(ENV_VAR) or REPO / ".venv-bench")


def tool(name: str) -> Path:
    """A command of the bench environment (vllm-router, sglang-router, aiperf, python)."""
    path = bench_venv() / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: create the peers' environment with: {RECIPE} "
                                f"(or set {ENV_VAR} to an environment that has them)")
    return path


def missing() -> str | None:
    """None when every peer command exists, else what to do."""
    for name in ("vllm-router", "sglang-router", "aiperf"):
        try:
            tool(name)
        except FileNotFoundError as exc:
            return str(exc)
    return None


def envoy_binary() -> Path:
    return REPO / ".venv" / "bin" / "envoy"


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Installed versions of the peers (pip metadata of the bench env) and of Envoy."""
    out: dict[str, str] = {}
    try:
        code = ("import json, importlib.metadata as m; "
                f"print(json.dumps({{p: m.version(p) for p in {list(PEER_PACKAGES)!r}}}))")
        res = subprocess.run([str(tool("python")), "-c", code], capture_output=True, text=True, timeout=60)
        out.update(json.loads(res.stdout))
    except (FileNotFoundError, subprocess.SubprocessError, ValueError) as exc:
        out["peers"] = f"unavailable ({exc.__class__.__name__})"
    try:
        res = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30)
        m = re.search(r"version: \S+?/(\d+\.\d+\.\d+)", res.stdout + res.stderr)
        out["envoy"] = m.group(1) if m else (res.stdout + res.stderr).strip()[-80:]
    except (OSError, subprocess.SubprocessError) as exc:
        out["envoy"] = f"unavailable ({exc.__class__.__name__})"
    try:
        import importlib.metadata as m

        out["kvswitch"] = m.version("kvswitch")
    except Exception:  # noqa: BLE001
        pass
    return out
