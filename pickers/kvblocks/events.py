"""Decoding vLLM KV cache events (ZMQ payloads) into plain records.

A message is three frames: topic, an 8-byte big-endian sequence number, and a msgpack payload
``[timestamp, [events...], data_parallel_rank?]`` (a map ``{"ts", "events", "data_parallel_rank"}`` is
accepted too). Newer vLLM encodes each event as a map with a ``"type"`` key; older versions as a positional
array with the tag first (msgspec ``array_like=True, tag=True``), fields in declaration order:

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, ...]
    ["BlockRemoved", block_hashes, medium, ...]
    ["AllBlocksCleared"]

Hashes arrive as unsigned ints or raw bytes; both are kept as they are (they only serve as identities).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_decoder = msgspec.msgpack.Decoder()


class EventError(ValueError):
    """A payload that is not a KV event batch."""




@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent] = field(default_factory=list)
    dp_rank: int | None = None
    unknown: int = 0  # events of types we do not use (skipped, counted)


def _hashes(v: Any) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise EventError(f"block_hashes must be a list, got {type(v).__name__}")
    return list(v)


def decode_event(raw: Any) -> KVEvent | None:
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            return BlockStored(
                block_hashes=_hashes(raw.get("block_hashes")),
                parent_block_hash=raw.get("parent_block_hash"),
                token_ids=list(raw.get("token_ids") or []),
                block_size=int(raw.get("block_size") or 0),
                medium=raw.get("medium", "GPU"),
                lora_id=raw.get("lora_id"),
                lora_name=raw.get("lora_name"),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(raw.get("block_hashes")), raw.get("medium", "GPU"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        return None
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind = raw[0]
        f = list(raw[1:])
        if kind == "BlockStored":
            if len(f) < 4:
                raise EventError("positional BlockStored needs at least 4 fields")
            return BlockStored(
                block_hashes=_hashes(f[0]),
                parent_block_hash=f[1],
                token_ids=list(f[2] or []),
                block_size=int(f[3] or 0),
                lora_id=f[4] if len(f) > 4 else None,
                medium=f[5] if len(f) > 5 else "GPU",
                lora_name=f[6] if len(f) > 6 else None,
            )
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(f[0] if f else None), f[1] if len(f) > 1 else "GPU")
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        return None
    raise EventError(f"event must be a map with 'type' or an array with a tag first, got {type(raw).__name__}")


def decode_payload(payload: bytes) -> EventBatch:
    """Decode one msgpack payload; raises EventError on anything that is not an event batch."""
    try:
        raw = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise EventError(f"not msgpack: {e}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts", 0.0), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, (list, tuple)) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise EventError("payload must be [ts, [events...], dp_rank?]")
    if not isinstance(events, (list, tuple)):
        raise EventError("payload events must be a list")
    batch = EventBatch(ts=float(ts or 0.0), dp_rank=rank)
    for raw_event in events:
        ev = decode_event(raw_event)
        if ev is None:
            batch.unknown += 1
        else:
            batch.events.append(ev)
    return batch


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EventError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def encode_batch(events: list[dict[str, Any] | list[Any]], ts: float = 0.0, dp_rank: int | None = None) -> bytes:
    """Encode a batch the way vLLM does (tests and the simulator's helpers)."""
    return msgspec.msgpack.encode([ts, events, dp_rank] if dp_rank is not None else [ts, events])
