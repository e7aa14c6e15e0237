"""Prefix-cache block identities and the indexes built on them."""

from engine.kvcache.hashing import ROOT_HASH, chain_hash, hash_blocks

__all__ = ["ROOT_HASH", "chain_hash", "hash_blocks"]
