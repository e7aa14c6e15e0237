"""Waiting until a ZMQ SUB socket has joined its publisher, instead of sleeping a fixed time.

PUB drops what it publishes before a subscriber's subscription reaches it (the "slow joiner"). The SUB side
sends its subscription as the first message after the ZMTP handshake, so once the socket monitor reports
HANDSHAKE_SUCCEEDED the subscription is on its way over loopback ahead of anything a test triggers next.
Open the monitor before ``connect`` so the event cannot be missed.
"""

from __future__ import annotations

import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

_EVENT = zmq.EVENT_HANDSHAKE_SUCCEEDED


def monitor(sock: zmq.Socket) -> zmq.Socket:
    """A monitor socket reporting the handshake of ``sock`` (call before ``sock.connect``)."""
    return sock.get_monitor_socket(_EVENT)


def wait_joined(mon: zmq.Socket, timeout: float = 10.0) -> None:
    """Block until the monitored socket completed its handshake (raises TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not mon.poll(left * 1000):
            raise TimeoutError(f"no ZMQ handshake within {timeout}s")
        if parse_monitor_message(mon.recv_multipart())["event"] == _EVENT:
            return


async def wait_joined_async(mon: zmq.asyncio.Socket, timeout: float = 10.0) -> None:
    """``wait_joined`` for a socket of a ``zmq.asyncio.Context``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not await mon.poll(left * 1000):
            raise TimeoutError(f"no ZMQ handshake within {timeout}s")
        if parse_monitor_message(await mon.recv_multipart())["event"] == _EVENT:
            return
