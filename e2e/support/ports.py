"""Free loopback ports picked at run time (several people run tests on this machine at once)."""

from __future__ import annotations

import socket

from extproc.localstack.ports import free_port

__all__ = ["PORT_CLASH", "dead_address", "free_port", "free_port_pair", "free_ports", "port_clash"]

# What a process logs when a port picked for it was taken before it bound it: the OS's message, which vLLM and
# zmq print as is ("Address already in use") and asyncio's servers in lower case (the simulated fleet).
PORT_CLASH = "address already in use"


def port_clash(log: str) -> bool:
    """Whether a failed start-up's log says one of its ports was taken (the cue to relaunch on fresh ones)."""
    return PORT_CLASH in log.lower()


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
