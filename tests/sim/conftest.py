"""Fixtures for the simulated fleet tests: fleets on free ports, stopped after each test."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from e2e.support.zmqjoin import monitor, wait_joined_async
from engine.sim.fleet import SimFleet
from engine.sim.spec import PodSpec


@pytest.fixture
async def fleet_factory():
    fleets: list[SimFleet] = []

    async def make(specs: list[PodSpec], time_scale: float = 0.05, tokenizer=None) -> SimFleet:
        f = SimFleet(specs, time_scale=time_scale, tokenizer=tokenizer)
        await f.start()
        fleets.append(f)
        return f

    try:
        yield make
    finally:
        for f in fleets:
            await f.stop()


class EventSub:
    """A ZMQ SUB socket on a pod's KV events, decoding [seq, (ts, events, rank)]."""

    def __init__(self, endpoint: str, topic: bytes = b"kv-events") -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self._monitor = monitor(self.sock)
        self.sock.connect(endpoint)

    async def joined(self, timeout: float = 10.0) -> None:
        """Until the subscription reached the pod's publisher (ZMQ drops what PUB sends before that): the SUB's
        handshake completed, plus a 50 ms margin for the publisher's I/O thread to apply the subscription (a CI
        run lost the first event without it; the handshake alone does not prove the far side applied it)."""
        await wait_joined_async(self._monitor, timeout)
        await asyncio.sleep(0.05)

    async def recv(self, timeout: float = 5.0):
        if not await self.sock.poll(timeout * 1000):
            raise TimeoutError("no KV event message")
        topic, seq, payload = await self.sock.recv_multipart()
        return topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)

    async def drain(self, quiet: float = 0.3) -> list:
        out = []
        while await self.sock.poll(quiet * 1000):
            topic, seq, payload = await self.sock.recv_multipart()
            out.append((int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))
        return out

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def subscribe():
    subs: list[EventSub] = []

    def make(endpoint: str) -> EventSub:
        s = EventSub(endpoint)
        subs.append(s)
        return s

    try:
        yield make
    finally:
        for s in subs:
            s.close()
