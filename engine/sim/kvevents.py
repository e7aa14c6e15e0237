"""KV cache events on ZMQ, in vLLM's wire format (vllm/distributed/kv_events.py, ZmqEventPublisher).

One message per engine step that changed the cache, three frames: topic, an 8-byte big-endian
sequence number (from 0, per publisher; a restarted pod starts again at 0), and a msgpack payload
``[timestamp, [events...], data_parallel_rank]``. Events are maps with a ``"type"`` key (vLLM 0.32) or,
with ``event_format="array"``, the older positional arrays with the tag first.

The PUB socket is used from the event loop without blocking: PUB never blocks, and a message beyond
the high-water mark is dropped by ZMQ (as vLLM's is). An optional ROUTER replay socket answers a
request carrying a start sequence number with every buffered message from there, then an end marker
(sequence -1, empty payload), as vLLM's replay endpoint does; the buffer holds the last
``buffer_steps`` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from engine.sim.blockpool import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

DEFAULT_TOPIC = b"kv-events"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)

_encoder = msgspec.msgpack.Encoder()


def event_to_wire(ev: KVEvent, fmt: str = "map", group_idx: int | None = 0) -> Any:
    """One event as vLLM serialises it: a tagged map (default) or a positional array (older vLLM)."""
    if isinstance(ev, BlockStored):
        # a list on the wire (an in-process pool keeps the engine's array: engine.sim.blockpool)
        toks = ev.token_ids if isinstance(ev.token_ids, list) else np.asarray(ev.token_ids).tolist()
        if fmt == "array":
            return ["BlockStored", ev.block_hashes, ev.parent_block_hash, toks, ev.block_size,
                    ev.lora_id, ev.medium, ev.lora_name]
        out = {
            "type": "BlockStored", "block_hashes": ev.block_hashes, "parent_block_hash": ev.parent_block_hash,
            "token_ids": toks, "block_size": ev.block_size, "lora_id": ev.lora_id,
            "medium": ev.medium, "lora_name": ev.lora_name, "extra_keys": [None] * len(ev.block_hashes),
        }
    elif isinstance(ev, BlockRemoved):
        if fmt == "array":
            return ["BlockRemoved", ev.block_hashes, ev.medium]
        out = {"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": ev.medium}
    elif isinstance(ev, AllBlocksCleared):
        return ["AllBlocksCleared"] if fmt == "array" else {"type": "AllBlocksCleared"}
    else:  # pragma: no cover - the pool emits only the three kinds
        raise TypeError(f"not a KV event: {ev!r}")
    if group_idx is not None:
        out["group_idx"] = group_idx
    if out["type"] == "BlockStored":
        out["kv_cache_spec_kind"] = "full_attention"
    return out


def encode_batch(events: Sequence[KVEvent], ts: float, dp_rank: int | None = 0, fmt: str = "map") -> bytes:
    return _encoder.encode([ts, [event_to_wire(e, fmt) for e in events], dp_rank])


def decode_batch(payload: bytes) -> tuple[float, list[Any], int | None]:
    """The inverse, for tests and tools: (timestamp, events, dp_rank)."""
    msg = msgspec.msgpack.decode(payload)
    return msg[0], msg[1], (msg[2] if len(msg) > 2 else None)


class KVEventPublisher:
    """A ZMQ PUB socket bound to ``endpoint`` (port 0 or ``*`` picks a free port; see ``.endpoint``)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:*",
        topic: bytes = DEFAULT_TOPIC,
        fmt: str = "map",
        dp_rank: int | None = 0,
        hwm: int = 100_000,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
    ) -> None:
        if fmt not in ("map", "array"):
            raise ValueError("event format must be 'map' or 'array'")
        self.topic = topic
        self.fmt = fmt
        self.dp_rank = dp_rank
        self.enabled = True  # faults turn this off: messages are dropped, the sequence does not advance
        self.seq = 0
        self.sent = 0
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(_wildcard(endpoint))
        self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._replay_task: asyncio.Task | None = None
        if replay_endpoint:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(_wildcard(replay_endpoint))
            self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> None:
        if self._router is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> bool:
        """Send one batch; False when publishing is off or ZMQ dropped it."""
        if not self.enabled or not events:
            return False
        payload = encode_batch(events, time.time() if ts is None else ts, self.dp_rank, self.fmt)
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        try:
            # zmq.asyncio's send on PUB completes immediately (PUB never blocks); the returned future
            # needs no awaiting.
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.sent += 1
        return True

    def restart(self) -> None:
        """A restarted engine: sequence numbers start again at 0 and the replay buffer is empty."""
        self.seq = 0
        self._buffer.clear()

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) < 2:
                continue
            ident, start = frames[0], int.from_bytes(frames[-1][:8], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            await self._router.send_multipart([ident, b"", END_OF_REPLAY, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        self._pub.close(0)
        if self._router is not None:
            self._router.close(0)
        self._ctx.term()


def _wildcard(endpoint: str) -> str:
    """ZMQ picks a free port for ``:*``; accept ``:0`` for the same."""
    return endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint


__all__ = ["DEFAULT_TOPIC", "KVEventPublisher", "decode_batch", "encode_batch", "event_to_wire"]
