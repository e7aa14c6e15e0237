"""A data-parallel pod: N engine cores behind one port, as vLLM with --data-parallel-size N.

The rank header is honoured (and bounds-checked as vLLM does), each rank has its own prefix cache and metric
series (engine="<rank>"), and each rank publishes its KV events on its own socket with its rank in the batch.
"""

from __future__ import annotations

import aiohttp
import pytest

from e2e.support.ports import free_port_pair
from engine.costmodel.dataparallel import DataParallelCost
from engine.sim.core import EngineConfig, SimRequest
from engine.sim.dpgroup import DPGroup, RankBalancer
from engine.sim.spec import PodSpec

from .test_sim_server import metrics

PROMPT = "the same long shared prefix " * 20


async def _post(address: str, rank: str | None, prompt: str = PROMPT) -> tuple[int, dict]:
    headers = {} if rank is None else {"X-data-parallel-rank": rank}
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(f"http://{address}/v1/completions", json=body,
                                                    headers=headers) as r:
        return r.status, await r.json()


async def _state(address: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/sim/state") as r:
        return await r.json()


async def _joined(pod, subs, deadline_s: float = 10.0) -> None:
    """Wait out ZMQ's slow joiner: clear the caches (every rank publishes AllBlocksCleared) until every
    subscriber has received one, then drop what arrived."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    got = [False] * len(subs)
    while not all(got):
        assert loop.time() < end, "KV event subscribers never joined"
        pod.reset_prefix_cache()
        for i, sub in enumerate(subs):
            got[i] = got[i] or bool(await sub.sock.poll(50))
    for sub in subs:
        await sub.drain(0.1)




async def test_rank_header_metrics_and_events_per_rank(fleet_factory, subscribe):
    base = free_port_pair()
    fleet = await fleet_factory([PodSpec(name="dp", dp_size=2, kv_events_port=base, model_profile="moe",
                                         accelerator="H200", num_blocks=256)], time_scale=0.01)
    pod = fleet.pods[0]
    assert pod.kv_events_endpoints == [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"]
    subs = [subscribe(e) for e in pod.kv_events_endpoints]
    await _joined(pod, subs)

    # rank 1 twice: the second request hits rank 1's cache; rank 0 has never seen the prompt
    for _ in range(2):
        status, body = await _post(pod.address, "1")
        assert status == 200
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    status, body = await _post(pod.address, "0")
    assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    st = await _state(pod.address)
    assert st["dp_size"] == 2 and [r["requests"] for r in st["ranks"]] == [1, 2]
    assert [r["engine_id"].rsplit("_", 1)[1] for r in st["ranks"]] == ["dp0", "dp1"]

    # vLLM: an out-of-range rank is a 400; a value that is not a number is ignored (internal balancing)
    status, body = await _post(pod.address, "2")
    assert status == 400 and "out of range [0, 2)" in body["error"]["message"]
    status, _ = await _post(pod.address, "x", prompt="another prompt " * 10)
    assert status == 200
    assert sum(r["requests"] for r in (await _state(pod.address))["ranks"]) == 4

    fams = await metrics(pod.address)
    by_engine: dict[str, float] = {}
    for s in fams["vllm:prefix_cache_hits"].samples:
        if s.name == "vllm:prefix_cache_hits_total":
            by_engine[s.labels["engine"]] = s.value
    assert set(by_engine) == {"0", "1"} and by_engine["1"] > 0 and by_engine["0"] == 0
    assert {s.labels["engine"] for s in fams["vllm:cache_config_info"].samples} == {"0", "1"}

    # each rank's socket carries only its own batches, tagged with its rank (the third payload field)
    for rank, sub in enumerate(subs):
        msgs = await sub.drain()
        assert msgs and {payload[2] for _, payload in msgs} == {rank}
        seqs = [seq for seq, _ in msgs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one gapless sequence per publisher


def test_group_steps_in_lockstep_and_waits_for_the_straggler():
    cost = DataParallelCost("moe", "H200", dp=4)
    g = DPGroup(cost, EngineConfig(num_blocks=512, engine_id="g"))
    long, short = list(range(1, 2001)), list(range(1, 33))
    g.add_request(SimRequest("a", long, 4), rank=2)
    g.add_request(SimRequest("b", short, 4), rank=0)
    step = g.step(0.0)
    own = cost.rank_step_time(32, 32 * 33 / 2, 0)
    assert step.duration == pytest.approx(cost.rank_step_time(2000, 2000 * 2001 / 2, 0))
    assert step.duration > 5 * own  # the short request's rank waits for the long prefill
    assert all(r.end == step.end for r in step.results if r.outputs)
    assert g.busy_time[0] == pytest.approx(own) and g.busy_time[1] == 0.0
    with pytest.raises(ValueError, match="out of range"):
        g.add_request(SimRequest("c", short, 1), rank=4)


def test_internal_balancer_spreads_a_burst_and_legacy_piles_on_rank_zero():
    new, old = RankBalancer(4), RankBalancer(4, policy="legacy")
    picks = [new.pick() for _ in range(8)]
    for i in range(8):
        new.inflight[picks[i]] += 1
    assert sorted(picks) == [0, 0, 1, 1, 2, 2, 3, 3]
    # legacy: an idle snapshot scores 0 everywhere, the count is not raised for a 0 score: all to rank 0
    assert [old.pick() for _ in range(8)] == [0] * 8
