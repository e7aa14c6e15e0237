"""Subscribe to a pod's KV-event ZMQ PUB socket and keep the raw and decoded messages, for tests.

Decodes the wire format as it is, without interpretation: three frames (topic, 8-byte big-endian
sequence number, msgpack payload ``[ts, [event, ...], dp_rank?]``), each event a map with a ``type`` key
(vLLM >= 0.1x) or a positional array with the tag first (older versions).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from e2e.support.zmqjoin import monitor, wait_joined


@dataclass
class KvMessage:
    """One ZMQ message as received."""

    topic: bytes
    seq_raw: bytes
    payload_raw: bytes
    frames: int
    received_at: float
    payload: Any = None

    @property
    def seq(self) -> int:
        return int.from_bytes(self.seq_raw, "big")

    @property
    def events(self) -> list[Any]:
        return list(self.payload[1]) if isinstance(self.payload, list) and len(self.payload) > 1 else []


@dataclass
class KvEventCollector:
    """A SUB socket on ``endpoint`` (e.g. ``tcp://127.0.0.1:5557``) read by a background thread."""

    endpoint: str
    topic: bytes = b""
    messages: list[KvMessage] = field(default_factory=list)
    max_messages: int = 10_000

    def __post_init__(self) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._sock.setsockopt(zmq.RCVTIMEO, 100)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = monitor(self._sock)  # read by the caller's thread only (joined), never by _run
        self._sock.connect(self.endpoint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-sub {self.endpoint}", daemon=True)
        self._thread.start()
        self._decoder = msgspec.msgpack.Decoder()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder()
        while not self._stop.is_set():
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                break
            msg = KvMessage(
                topic=frames[0],
                seq_raw=frames[1] if len(frames) > 1 else b"",
                payload_raw=frames[-1],
                frames=len(frames),
                received_at=time.monotonic(),
            )
            try:
                msg.payload = decoder.decode(msg.payload_raw)
            except msgspec.DecodeError as exc:  # keep it: a bad payload is itself a finding
                msg.payload = exc
            with self._lock:
                if len(self.messages) < self.max_messages:
                    self.messages.append(msg)

    def snapshot(self) -> list[KvMessage]:
        with self._lock:
            return list(self.messages)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def events(self) -> list[dict[str, Any]]:
        """All events so far, normalised to maps (positional arrays get their field names)."""
        return [normalise_event(e) for m in self.snapshot() for e in m.events]

    def wait_for(self, predicate, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``predicate(events)`` holds; returns the events (raises TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events()
            if predicate(evs):
                return evs
            if time.monotonic() > deadline:
                raise TimeoutError(f"KV events from {self.endpoint} never satisfied the condition: {evs!r:.2000}")
            time.sleep(0.05)

    def joined(self, timeout: float = 10.0) -> KvEventCollector:
        """Until the subscription reached the publisher: what the engine publishes after this is seen."""
        wait_joined(self._monitor, timeout)
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> KvEventCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_POSITIONAL_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}


def normalise_event(event: Any) -> dict[str, Any]:
    """A map event as is; a positional ``[tag, fields...]`` event as a map with ``type``."""
    if isinstance(event, dict):
        return event
    if isinstance(event, (list, tuple)) and event and isinstance(event[0], str):
        names = _POSITIONAL_FIELDS.get(event[0], [])
        out: dict[str, Any] = {"type": event[0]}
        out.update(zip(names, event[1:]))
        return out
    raise ValueError(f"not a KV event: {event!r:.200}")
