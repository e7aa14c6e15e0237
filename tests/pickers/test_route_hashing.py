"""A routed prompt's block hashes: an array of uint64 keys (what the indexes look up), computed on the event loop
unless the prompt is long enough for a worker thread's hop to pay (``OFFLOAD_HASH_TOKENS``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pickers.director
import pickers.framework
from engine.kvcache.hashing import MAX_ROUTED_BLOCKS, hash_block_keys, hash_blocks
from pickers.director import OFFLOAD_HASH_TOKENS
from tests.pickers.helpers import BS, request, scheduler


@pytest.mark.parametrize(("tokens", "threaded"), [
    (50_000, False),  # a ~200 KB prompt: ~50 us of hashing, less than a thread's hop
    (OFFLOAD_HASH_TOKENS + BS, True),
])
async def test_long_prompts_are_hashed_off_the_loop_only_where_it_pays(monkeypatch, tokens, threaded):
    seen: list[int] = []

    def spy(*args, **kw):
        seen.append(threading.get_ident())
        return hash_block_keys(*args, **kw)

    monkeypatch.setattr(pickers.director, "hash_block_keys", spy)
    monkeypatch.setattr(pickers.framework, "hash_block_keys", spy)
    s, _ = scheduler()
    ids = np.random.default_rng(tokens).integers(0, 50_000, tokens)
    decision = await s.route(request("r", ids))
    assert len(seen) == 1 and (seen[0] != threading.get_ident()) is threaded
    got = decision.state.block_hashes[BS]
    assert isinstance(got, np.ndarray) and got.dtype == np.uint64
    assert got.tolist() == hash_blocks(ids, BS, limit=MAX_ROUTED_BLOCKS)  # the array is the list's keys


@pytest.mark.parametrize("block_size", [16, 4096])  # compiled chain / the library's long-block branch
def test_the_key_array_and_the_list_agree_on_both_branches(block_size):
    ids = np.arange(3 * block_size + 5, dtype=np.uint32)
    keys = hash_block_keys(ids, block_size, limit=2)
    assert keys.dtype == np.uint64 and keys.tolist() == hash_blocks(ids, block_size, limit=2)
    assert keys.size == 2 and hash_block_keys(ids[: block_size - 1], block_size).size == 0
