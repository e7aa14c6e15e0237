"""What the engine and the picker must agree on about KV cache blocks, in one place both import.

- ``hashing``: the chained block hash (block i named by its tokens and the hash of block i-1) that the
  picker computes for requests and for the token ids in KV events, and the simulator uses for its pools.
- ``events``: the KV cache event records vLLM publishes (BlockStored, BlockRemoved, AllBlocksCleared).
- ``rowtable``: a compiled hash -> row table over flat arrays, the block map of the picker's prefix index and
  of the simulator's block pool.

engine/sim builds and publishes these; pickers/kvblocks decodes them off the wire and indexes them. Neither
imports the other.
"""
