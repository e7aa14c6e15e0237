"""ZMQ SUB sockets, one per pod, feeding its KV events into the precise index.

One socket per endpoint (not one socket connected to all): a SUB socket does not say which publisher a message
came from, and sequence numbers are per publisher. The exception is a pod-level endpoint of a data-parallel
pod seen without ranks (``Endpoint.kv_events`` lists every rank's publisher, comma-separated): its batches
carry the publishing rank, and the index keeps sequence numbers per (endpoint, rank). Every batch is
attributed to the rank that published it (``PreciseIndex.apply_message``). Every replica of the picker
subscribes to every pod, so replicas fed the same events hold the same index.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from pickers.clock import Clock
from pickers.kvblocks.precise import PreciseIndex

log = logging.getLogger("kvswitch.pickers.kvevents")


class KVEventSubscriber:
    def __init__(self, index: PreciseIndex, clock: Clock, topic: str = "", rcvhwm: int = 100_000) -> None:
        self.index = index
        self.clock = clock
        self.topic = topic.encode()
        self.rcvhwm = rcvhwm
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._connected: dict[str, str] = {}

    def subscribe(self, address: str, zmq_endpoint: str) -> None:
        """Start listening to pod ``address`` at ``zmq_endpoint`` (e.g. tcp://10.0.0.7:5557)."""
        if self._connected.get(address) == zmq_endpoint and address in self._tasks:
            return
        self.unsubscribe(address)
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        self._connected[address] = zmq_endpoint
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._run(address, zmq_endpoint), name=f"kv-events {address}"
        )

    def unsubscribe(self, address: str) -> None:
        task = self._tasks.pop(address, None)
        self._connected.pop(address, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._connected.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _run(self, address: str, zmq_endpoint: str) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        try:
            for publisher in zmq_endpoint.split(","):  # a pod-level endpoint may list every rank's publisher
                sock.connect(publisher.strip())
            log.info("subscribed to KV events of %s at %s", address, zmq_endpoint)
            while True:
                frames = await sock.recv_multipart()
                if len(frames) == 3:
                    _, seq, payload = frames
                elif len(frames) == 2:
                    seq, payload = frames
                else:
                    self.index.stats["bad_messages"] += 1
                    continue
                try:
                    self.index.apply_message(address, seq, payload, self.clock.now())
                except Exception:  # a bug in one message must not kill the subscription
                    log.exception("kv events from %s: failed to apply a message", address)
        except asyncio.CancelledError:
            pass
        finally:
            sock.close(0)
