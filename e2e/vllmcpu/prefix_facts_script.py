"""Run with vLLM's python: what vLLM's own KV cache manager gives a request scheduled right after another with the
same prompt, in the same scheduler step (printed as JSON).

``Scheduler.schedule`` admits waiting requests one after another: for each, ``get_computed_blocks`` (the prefix
hit) and then ``allocate_slots``, which already caches (``coordinator.cache_blocks``) the full blocks the step
will compute for it. No step is executed in between, so the second request's lookup sees the blocks the first is
still computing. This script builds vLLM's real ``KVCacheManager`` (as vLLM's tests/v1/core/test_prefix_caching.py
does: one full-attention group, a block hasher from kv_cache_utils) and replays that order:

- ``same_step_hit_tokens``: request A is allocated its whole prompt, then B (same prompt) looks up its hit;
- ``chunk_hit_tokens``: A is allocated only a first chunk of ``chunk_tokens``, then B looks up;
- ``before_alloc_hit_tokens``: B's hit when A only looked up (nothing allocated yet): the lookup alone caches
  nothing;
- ``schedule_order``: the waiting loop of ``Scheduler.schedule`` does the lookup before ``allocate_slots``, and
  ``allocate_slots`` calls ``cache_blocks`` with the computed plus the new tokens (source checks).

No model weights, no GPU.
"""

from __future__ import annotations

import inspect
import json

BLOCK_SIZE = 16
NUM_BLOCKS = 64
PROMPT_TOKENS = 160  # 10 full blocks
CHUNK_TOKENS = 64  # 4 full blocks


def main() -> int:
    import torch
    import vllm
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
    prompt = [(i * 7 + 3) % 30000 for i in range(PROMPT_TOKENS)]

    def manager() -> KVCacheManager:
        spec = FullAttentionSpec(BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32)
        config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
        return KVCacheManager(config, max_model_len=8192, scheduler_block_size=BLOCK_SIZE,
                              hash_block_size=BLOCK_SIZE, enable_caching=True)

    def request(rid: str) -> Request:
        return Request(rid, list(prompt), SamplingParams(max_tokens=4), None, block_hasher=hasher)

    def admit(m: KVCacheManager, r: Request, num_new_tokens: int | None) -> int:
        """One waiting request in ``Scheduler.schedule``: the lookup, then (unless None) ``allocate_slots``."""
        blocks, hit, _ = m.get_computed_blocks(r)
        if num_new_tokens is not None:
            n = min(num_new_tokens, r.num_tokens - hit)
            assert m.allocate_slots(r, n, num_new_computed_tokens=hit, new_computed_blocks=blocks) is not None
            r.num_computed_tokens = hit  # what the scheduler sets; the step's tokens are not computed yet
        return hit

    def b_after_a(a_tokens: int | None) -> tuple[int, int]:
        m = manager()
        a_hit = admit(m, request("a"), a_tokens)
        return a_hit, admit(m, request("b"), None)

    a_hit, same_step = b_after_a(PROMPT_TOKENS)
    _, chunk = b_after_a(CHUNK_TOKENS)
    _, before_alloc = b_after_a(None)

    waiting = inspect.getsource(Scheduler.schedule)
    waiting = waiting[waiting.find("schedule the WAITING requests"):]
    lookup = waiting.find("_get_local_prefix_cache_hit(request)")
    alloc = waiting.find("allocate_slots(")
    alloc_src = inspect.getsource(KVCacheManager.allocate_slots)
    facts = {
        "vllm_version": vllm.__version__,
        "block_size": BLOCK_SIZE,
        "prompt_tokens": PROMPT_TOKENS,
        "chunk_tokens": CHUNK_TOKENS,
        "a_hit_tokens": a_hit,
        "same_step_hit_tokens": same_step,
        "chunk_hit_tokens": chunk,
        "before_alloc_hit_tokens": before_alloc,
        "schedule_order": {
            "lookup_then_allocate": 0 <= lookup < alloc,
            "allocate_caches_new_tokens": "total_computed_tokens + num_new_tokens" in alloc_src
            and "cache_blocks(request, num_tokens_to_cache)" in alloc_src,
        },
    }
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
