"""KV events over real ZMQ: one publisher per pod, two picker replicas subscribed to every pod."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from engine.kvcache.hashing import hash_blocks
from pickers.clock import ManualClock
from pickers.config import build_scheduler
from pickers.kvblocks.events import encode_batch
from pickers.types import Endpoint

from .helpers import BS, cleared, metrics_page, removed, request, stored

TOK = np.arange(1, 4 * BS + 1)


async def _until(pred, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


METRICS = """# HELP vllm:num_requests_running x
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1
"""


@pytest.fixture
async def metrics_server():
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    async with metrics_page(metrics) as port:
        yield f"http://127.0.0.1:{port}/metrics"


@pytest.fixture
async def publishers():
    ctx = zmq.asyncio.Context()
    socks = []
    try:
        for _ in range(2):
            s = ctx.socket(zmq.XPUB)  # XPUB so the test can see when subscribers joined
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.XPUB_VERBOSE, 1)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            socks.append((s, f"tcp://127.0.0.1:{port}"))
        yield socks
    finally:
        for s, _ in socks:
            s.close(0)
        ctx.term()


async def test_two_replicas_reach_the_same_index(publishers, metrics_server):
    eps = [Endpoint(f"127.0.0.1:{1 + i}", kv_events=url, metrics_url=metrics_server)
           for i, (_, url) in enumerate(publishers)]
    clock = ManualClock(10.0)
    raw = {"datalayer": {"scrape_interval_ms": 1000}, "prefix": {"precise": {"degraded_after_s": 5}}}
    regs = [CollectorRegistry(), CollectorRegistry()]
    reps = [build_scheduler(raw, eps, clock, network=True, registry=r) for r in regs]
    try:
        for r in reps:
            await r.start()
        for s, _ in publishers:  # each publisher sees both replicas subscribe
            for _ in range(2):
                msg = await asyncio.wait_for(s.recv(), 5)
                assert msg[:1] == b"\x01"
        (pa, _), (pb, _) = publishers
        a, b = eps[0].address, eps[1].address

        async def send(sock, seq, events):
            await sock.send_multipart([b"kv-events", seq.to_bytes(8, "big"), encode_batch(events, ts=1.0)])

        await send(pa, 1, [stored([11, 12], TOK[: 2 * BS])])  # map form
        await send(pa, 2, [stored([13, 14], TOK[2 * BS:], parent=12, positional=True)])  # positional form
        await send(pb, 1, [stored([21, 22], TOK[: 2 * BS], positional=True)])
        await send(pb, 2, [removed([22])])
        own = hash_blocks(TOK, BS)
        for r in reps:
            await _until(lambda r=r: r.dl.kv_index.stats["messages"] >= 4)
            blocks = r.dl.kv_index.index.match(own, touch=False)[0]
            sa, sb = r.dl.endpoints.slot(a), r.dl.endpoints.slot(b)
            assert (blocks[sa], blocks[sb]) == (4, 1)
        c0 = reps[0].dl.kv_index.contents_by_address()
        assert c0 == reps[1].dl.kv_index.contents_by_address() and len(c0) == 4

        await send(pb, 3, [cleared(positional=True)])
        for r in reps:
            await _until(lambda r=r: r.dl.kv_index.stats["messages"] >= 5)
        assert all(b not in str(r.dl.kv_index.contents_by_address()) for r in reps)

        # sequence gap on a: 2 -> 9. Its entries are dropped and the degraded metric flips on.
        await send(pa, 9, [stored([31], TOK[:BS])])
        for r in reps:
            await _until(lambda r=r: r.dl.kv_index.stats["gaps"] == 1)
        for r, reg in zip(reps, regs):
            d = r.decide(request("x", TOK))
            r.on_first_token(d, clock.now())  # its pending (speculative) blocks go: the events' blocks remain
            assert reg.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": a}) == 1.0
            assert r.dl.kv_index.index.match(own, touch=False)[0][r.dl.endpoints.slot(a)] == 1
        clock.advance(6)
        await send(pa, 10, [stored([32], TOK[BS: 2 * BS], parent=31)])
        for r, reg in zip(reps, regs):
            await _until(lambda r=r: r.dl.kv_index.stats["messages"] >= 7)
            r.decide(request("y", TOK))
            assert reg.get_sample_value("kvswitch_prefix_index_degraded", {"endpoint": a}) == 0.0
        assert reps[0].dl.kv_index.contents_by_address() == reps[1].dl.kv_index.contents_by_address()
    finally:
        for r in reps:
            await r.stop()
