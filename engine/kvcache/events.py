"""vLLM's KV cache event records (vllm/distributed/kv_events.py), field for field in vLLM's order.

The simulator's block pool produces these; the picker's decoder (pickers/kvblocks/events.py) turns both wire
shapes (map and positional) into them; the precise index consumes them. Hashes are kept as they arrive
(unsigned ints or raw bytes): they only serve as identities for later removals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

GPU = "GPU"


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int] | np.ndarray  # a list off the wire; the engine's own array in process (virtual time)
    block_size: int
    lora_id: int | None = None
    medium: str | None = GPU
    lora_name: str | None = None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[Any]
    medium: str | None = GPU


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

__all__ = ["GPU", "AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent"]
