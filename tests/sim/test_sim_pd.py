"""Prefill/decode pods over HTTP with the NIXL protocol's kv_transfer_params."""

from __future__ import annotations

import aiohttp

from e2e.support.waits import until
from engine.sim.spec import PodSpec

PROMPT = list(range(7, 7 + 1000))
LEG = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
       "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def post(s: aiohttp.ClientSession, addr: str, body: dict) -> dict:
    async with s.post(f"http://{addr}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_prefill_then_decode_moves_blocks_and_releases_them(fleet_factory, subscribe):
    fleet = await fleet_factory([
        PodSpec(name="pre", role="prefill", num_blocks=256, seed=1),
        PodSpec(name="dec", role="decode", num_blocks=256, seed=2),
    ], time_scale=0.05)
    pre, dec = fleet["pre"], fleet["dec"]
    sub = subscribe(dec.kv_events_endpoint)
    await sub.joined()
    async with aiohttp.ClientSession() as s:
        r = await post(s, pre.address, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1,
                                         "kv_transfer_params": LEG})
        kvp = r["kv_transfer_params"]
        assert kvp["do_remote_prefill"] is True and kvp["remote_engine_id"] == pre.core.engine_id
        assert kvp["remote_host"] == "127.0.0.1" and kvp["remote_port"] == pre.port
        assert len(kvp["remote_block_ids"]) == 63 and kvp["tp_size"] == 1
        assert pre.core.stats().num_held_blocks == 63
        before = dec.sim_now()
        r2 = await post(s, dec.address, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3,
                                          "kv_transfer_params": kvp})
        assert r2["usage"]["completion_tokens"] == 3
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == 999
        assert r2["kv_transfer_params"] is None
        assert dec.sim_now() - before >= dec.cost.transfer_time(1000, "rdma-400g")
    assert pre.core.stats().num_held_blocks == 0  # released by the decode pod's pull
    hashes = dec.core.pool.hash_tokens(PROMPT)
    assert len(dec.core.pool.find_cached(hashes)) == 62
    msgs = await sub.drain()
    stored = [h for _, (_, evs, _) in msgs for e in evs if e["type"] == "BlockStored" for h in e["block_hashes"]]
    assert stored[:62] == hashes


async def test_held_blocks_freed_on_timeout(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="pre", role="prefill", num_blocks=128,
                                         kv_transfer_timeout_s=2.0)], time_scale=0.05)
    pre = fleet["pre"]
    async with aiohttp.ClientSession() as s:
        await post(s, pre.address, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1,
                                     "kv_transfer_params": LEG})
    assert pre.core.stats().num_held_blocks == 63
    await until(lambda: pre.core.stats().num_held_blocks == 0)  # 2 simulated seconds: ~0.1 s of wall time
    assert pre.core.pool.num_free == 128


async def test_release_over_http(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="pre", role="prefill", num_blocks=128)], time_scale=0.05)
    pre = fleet["pre"]
    async with aiohttp.ClientSession() as s:
        r = await post(s, pre.address, {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1,
                                         "kv_transfer_params": LEG})
        ids = r["kv_transfer_params"]["remote_block_ids"]
        async with s.post(f"http://{pre.address}/sim/kv/release", json={"block_ids": ids}) as resp:
            assert resp.status == 200 and (await resp.json()) == {"released": True}
        async with s.post(f"http://{pre.address}/sim/kv/release", json={"block_ids": "x"}) as resp:
            assert resp.status == 400 and "error" in await resp.json()
    assert pre.core.stats().num_held_blocks == 0
