"""The tiny random-weight Llama model + BPE tokenizer that real vLLM serves in tests.

Made by ``make_model_script.py`` under vLLM's python (transformers and torch live only there) and cached
under ``<repo>/.cache/vllm-tiny-model/v<VERSION>/``: made once, reused by every test session. The script is
deterministic (fixed seeds), so the same version always yields the same tokenizer and weights. Bump
``VERSION`` when the script changes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .env import REPO, vllm_python

VERSION = 1
SCRIPT = Path(__file__).with_name("make_model_script.py")
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_root() -> Path:
    return Path(os.environ.get("KVSWITCH_CACHE_DIR") or REPO / ".cache")


def model_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "vllm-tiny-model" / f"v{VERSION}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in REQUIRED)


def ensure_tiny_model(cache_root: Path | None = None, python: Path | None = None) -> Path:
    """The model folder, made now if missing. Safe when several sessions ask at once (file lock, atomic rename)."""
    target = model_dir(cache_root)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"v{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"v{VERSION}-", dir=target.parent))
        try:
            t0 = time.monotonic()
            done = subprocess.run(
                [str(python or vllm_python()), str(SCRIPT), str(tmp)],
                capture_output=True, text=True, timeout=300,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )
            if done.returncode != 0 or not is_complete(tmp):
                raise RuntimeError(
                    f"making the tiny model failed (rc={done.returncode}):\n{done.stdout[-2000:]}\n"
                    f"{done.stderr[-4000:]}"
                )
            (tmp / "kvswitch-made.json").write_text(
                json.dumps({"version": VERSION, "seconds": round(time.monotonic() - t0, 2)}) + "\n"
            )
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_tiny_model())
