"""pytest fixtures that start real vLLM. Load as a plugin: ``pytest -p e2e.vllmcpu.fixtures`` or, in a
conftest, ``pytest_plugins = ["e2e.vllmcpu.fixtures"]``.

- ``tiny_model_dir`` (session): folder of the tiny Llama model; also the tokenizer path (tokenizer.json,
  tokenizer_config.json with a chat template). Made once, cached under <repo>/.cache.
- ``vllm_pair`` (session): two running servers A and B on that model, with prefix caching, KV events (ZMQ)
  and ExampleConnector kv_both on one shared folder (prefill on one, decode on the other). See ``VllmPair``.

Without vLLM's python both fixtures skip the test (fail it when CI=true).
Env: KVSWITCH_VLLM_PYTHON (vLLM's python), KVSWITCH_VLLM_BLOCK_SIZE (force a block size; default: vLLM's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .env import require_vllm
from .server import VllmServer, start_all
from .tinymodel import ensure_tiny_model

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 2048
# 64 blocks x 128 tokens = 8192 tokens of KV: usage moves visibly, and a few long prompts force evictions.
NUM_BLOCKS = 64


@dataclass
class VllmPair:
    """Two real vLLM servers on one model. ``a.address`` / ``b.address`` are host:port; ``a.base_url`` for
    HTTP; ``a.kv_events_endpoint`` is the ZMQ endpoint to SUB to (topic ``kv-events``)."""

    a: VllmServer
    b: VllmServer
    model_dir: Path
    model_name: str
    block_size: int  # as vLLM reports it in vllm:cache_config_info
    max_model_len: int
    shared_storage_path: Path  # ExampleConnector's folder: KV written by one, loaded by the other

    @property
    def tokenizer_path(self) -> Path:
        return self.model_dir

    @property
    def servers(self) -> list[VllmServer]:
        return [self.a, self.b]

    def clear_shared_storage(self) -> None:
        """Forget KV saved by the connector, so the next request on either pod really computes its prefill."""
        for child in self.shared_storage_path.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def vllm_python_path() -> Path:
    return require_vllm()


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_python_path: Path) -> Path:
    return ensure_tiny_model(python=vllm_python_path)


@pytest.fixture(scope="session")
def vllm_pair(tiny_model_dir: Path) -> Iterator[VllmPair]:
    forced = os.environ.get("KVSWITCH_VLLM_BLOCK_SIZE")
    share = Path(tempfile.mkdtemp(prefix="kvswitch-kvshare-"))
    servers = [
        VllmServer(tiny_model_dir, model_name=MODEL_NAME, max_model_len=MAX_MODEL_LEN,
                   block_size=int(forced) if forced else None, num_blocks=NUM_BLOCKS,
                   shared_storage_path=share)
        for _ in range(2)
    ]
    try:
        start_all(servers)
        a, b = servers
        yield VllmPair(a=a, b=b, model_dir=tiny_model_dir, model_name=MODEL_NAME,
                       block_size=a.actual_block_size(), max_model_len=MAX_MODEL_LEN, shared_storage_path=share)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(share, ignore_errors=True)
