"""Free loopback ports picked at run time (several people run tests on this machine at once)."""

from __future__ import annotations

import socket

from extproc.localstack.ports import free_port

__all__ = ["dead_address", "free_port", "free_port_pair", "free_ports"]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair() -> int:
    """A port p with p + 1 free too (a data-parallel rank r publishes KV events on the configured port + r)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise RuntimeError("no two adjacent free ports")


def dead_address() -> str:
    """An ip:port where nothing listens (connect is refused)."""
    return f"127.0.0.1:{free_port()}"
