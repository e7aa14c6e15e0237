"""Fixtures shared by the benchmark's tests."""

from __future__ import annotations

import os

import pytest

from e2e.bench import peersenv


@pytest.fixture
def peers() -> None:
    """The peers' environment (vllm-router, sglang-router, aiperf): a test that needs it fails in CI without
    it (a missing dependency is a red build, not a skip) and is skipped elsewhere, saying how to make it."""
    why = peersenv.missing()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
