"""A free loopback port for the local stack's processes (``kvswitch up``); the tests and benchmarks pick theirs
with the same function (``e2e.support.ports``)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free when asked; another process may bind it before ours does (``EnvoyChild.start`` re-picks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
