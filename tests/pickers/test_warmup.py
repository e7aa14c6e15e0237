"""The picker's warm-up prefills (pickers/warmup.py): the queue's bounds and in-flight accounting, the replicate
scorer making its copy with one, and the real transport (a POST of token ids to a simulated pod, whose prefix
cache then holds the blocks)."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from pickers.datalayer.inflight import InflightTracker
from pickers.datalayer.warmupsender import WarmupSender
from pickers.types import Endpoint
from pickers.warmup import Warmups, WarmupSettings, piece_ends

EP_A, EP_B = Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000", dp_rank=1)


def queue(**settings: float) -> tuple[Warmups, InflightTracker]:
    inflight = InflightTracker(8)
    return Warmups(inflight, WarmupSettings(**settings)), inflight  # type: ignore[arg-type]


def test_a_warm_up_counts_as_prefill_queued_on_its_pod_until_it_ends():
    w, inflight = queue()
    tokens = np.arange(4096)
    assert w.offer(1, EP_B, "m", key=7, token_ids=tokens, now=0.0, prefill_s=0.5)
    assert inflight.prefill_tokens[1] == 4096 and inflight.requests[1] == 1
    (sent,) = w.take()
    assert (sent.endpoint_id, sent.address, sent.dp_rank, sent.model) == ("10.0.0.2:8000#1", "10.0.0.2:8000", 1, "m")
    assert sent.scheme == "http"
    tls = Endpoint("10.0.0.3:8443", metrics_url="https://10.0.0.3:8443/metrics")
    assert w.offer(2, tls, "m", key=8, token_ids=tokens, now=0.0, prefill_s=0.5)
    (tls_sent,) = w.take()
    assert tls_sent.scheme == "https"  # the pod's TLS, as its metrics show
    w.done(tls_sent.request_id, ok=False)
    assert w.failed == 1 and inflight.requests[2] == 0
    assert sent.token_ids.tolist() == tokens.tolist() and w.take() == []  # handed out once
    w.done(sent.request_id, ok=True)
    assert inflight.prefill_tokens[1] == 0 and inflight.requests[1] == 0 and len(w) == 0 and w.ok == 1
    w.done(sent.request_id, ok=True)  # a second report (or an unknown id) changes nothing
    assert w.ok == 1


def test_a_warm_up_is_sent_in_pieces_of_whole_blocks():
    assert piece_ends(4096, 512, 16) == (512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)
    assert piece_ends(1000, 300, 16) == (288, 576, 864, 1000)  # whole blocks, the last piece the rest
    assert piece_ends(4096, 8, 16) == tuple(range(16, 4097, 16))  # at least a block
    assert piece_ends(512, 512, 16) == (512,) and piece_ends(4096, 0, 16) == (4096,)
    w, _ = queue()
    assert w.offer(0, EP_A, "m", 1, np.arange(2048 + 32), 0.0, 0.1, block_size=32, piece_tokens=1024)
    (sent,) = w.take()
    assert sent.ends == (1024, 2048, 2080) and sent.piece(1).tolist() == list(range(2048))


def test_one_warm_up_per_pod_and_per_prefix_and_at_most_max_in_flight():
    w, _ = queue(max_in_flight=2)
    t = np.arange(64)
    assert w.offer(0, EP_A, "m", 1, t, 0.0, 0.1)
    assert not w.offer(0, EP_A, "m", 2, t, 0.0, 0.1)  # that pod is computing one
    assert not w.offer(1, EP_B, "m", 1, t, 0.0, 0.1)  # that prefix is being copied
    assert not w.offer(1, EP_B, "m", 2, t[:0], 0.0, 0.1)  # nothing to send
    assert w.offer(1, EP_B, "m", 2, t, 0.0, 0.1)
    assert not w.offer(2, Endpoint("10.0.0.3:8000"), "m", 3, t, 0.0, 0.1)  # two in flight: the bound
    assert len(w) == 2 and w.offered == 2


def test_a_warm_up_the_transport_never_reports_expires_and_frees_its_pod():
    w, inflight = queue(timeout_s=30.0)
    assert w.offer(0, EP_A, "m", 1, np.arange(64), 0.0, 0.1)
    w.expire(29.9)
    assert len(w) == 1 and inflight.requests[0] == 1
    assert w.offer(1, EP_B, "m", 2, np.arange(64), 31.0, 0.1)  # offering expires the old one first
    assert len(w) == 1 and w.expired == 1 and inflight.requests[0] == 0
    assert [x.slot for x in w.take()] == [1]  # the expired one is no longer handed out


def test_the_replicate_scorer_copies_with_a_warm_up_and_leaves_the_request_where_it_is_fastest():
    """With a transport, the scorer offers the group prefix (its whole blocks) to the quiet pod and is level:
    the request goes to the holder, and the copy pod counts the warm-up as queued prefill meanwhile."""
    from .helpers import scheduler
    from .test_plugins import A, B, C, _group_held_by, _group_request, _in_flight, cands, ctx_for, plugin

    s, clock = scheduler()
    s.dl.warmups = Warmups(s.dl.inflight)
    sc = plugin(s, "scorer", "replicate")
    c = cands(s)
    _group_held_by(s, A)
    _in_flight(s, clock, A, 5, decoding=True)
    _in_flight(s, clock, B, 1, decoding=True)
    _in_flight(s, clock, C, 3, decoding=True)
    for i in range(3):
        assert sc.score(ctx_for(s, clock, _group_request(f"g{i}", i)), c).tolist() == [1.0, 1.0, 1.0]
    (w,) = s.dl.warmups.take()
    b = s.dl.endpoints.slot(B)
    assert w.address == B and w.token_ids.tolist() == list(range(4096))
    assert s.dl.inflight.prefill_tokens[b] == 4096
    assert sc.score(ctx_for(s, clock, _group_request("g3", 3)), c).tolist() == [1.0, 1.0, 1.0]
    assert s.dl.warmups.take() == []  # B now has a prompt queued (the warm-up): no room, no second copy
    no_warm = plugin(s, "scorer", {"type": "replicate", "warm_up": False})  # the request itself makes the copy
    s.dl.warmups.done(w.request_id, ok=True)
    for i in range(2):
        no_warm.score(ctx_for(s, clock, _group_request(f"n{i}", 10 + i)), c)
    assert no_warm.score(ctx_for(s, clock, _group_request("n2", 12)), c).tolist() == [0.0, 1.0, 0.0]


async def test_the_sender_posts_the_prefix_as_token_ids_and_the_pod_caches_it():
    """Through a real simulated pod over HTTP: the warm-up's pieces are posted in order, and its blocks are in
    the pod's prefix cache afterwards (a request with that prefix finds them cached); the in-flight count is
    released when the last POST ends."""
    from engine.sim.fleet import SimFleet
    from engine.sim.spec import PodSpec

    fleet = SimFleet([PodSpec(name="p", seed=3)], time_scale=0.05)
    await fleet.start()
    address = fleet.pods[0].address
    inflight = InflightTracker(4)
    w = Warmups(inflight)
    outcomes: list[str] = []
    w.count = outcomes.append  # the director points this at kvswitch_warmups{outcome}
    piece_s: list[float] = []
    w.piece_time = piece_s.append  # and this at kvswitch_warmup_piece_seconds
    sender = WarmupSender(w, concurrency=2, timeout_s=10.0)
    await sender.start()
    try:
        prefix = list(range(1000, 1000 + 1024))
        assert w.offer(0, Endpoint(address), "sim-model", 5, np.array(prefix), 0.0, 0.2, piece_tokens=512)
        for _ in range(200):
            if not len(w):
                break
            await asyncio.sleep(0.02)
        assert (w.ok, w.failed, len(w), inflight.requests[0]) == (1, 0, 0, 0) and outcomes == ["offered", "ok"]
        async with aiohttp.ClientSession() as http, http.get(f"http://{address}/metrics") as resp:
            page = await resp.text()
        # two pieces of 512, the second posted after the first had answered: it found the first cached
        assert 'vllm:prefix_cache_hits_total{engine="0",model_name="sim-model"} 512.0' in page, page
        # the pod's TTFT histogram counts both pieces; the picker timed each (what the benchmark takes out of
        # the pods' TTFT to judge the users' requests alone: e2e/bench/runner.py)
        assert 'vllm:time_to_first_token_seconds_count{engine="0",model_name="sim-model"} 2.0' in page, page
        assert len(piece_s) == 2 and all(t > 0 for t in piece_s)
        async with aiohttp.ClientSession() as http, http.post(
                f"http://{address}/v1/completions",
                json={"model": "sim-model", "prompt": prefix + [7, 8, 9], "max_tokens": 1}) as resp:
            usage = (await resp.json())["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 1024
    finally:
        await sender.stop()
        await fleet.stop()


async def test_a_warm_up_to_a_pod_that_is_gone_fails_and_frees_its_count():
    from e2e.support.ports import free_port_pair

    port = free_port_pair()
    inflight = InflightTracker(4)
    w = Warmups(inflight)
    piece_s: list[float] = []
    w.piece_time = piece_s.append
    sender = WarmupSender(w, timeout_s=5.0)
    await sender.start()
    try:
        assert w.offer(2, Endpoint(f"127.0.0.1:{port}"), "m", 1, np.arange(32), 0.0, 0.1)
        for _ in range(200):
            if not len(w):
                break
            await asyncio.sleep(0.02)
        assert (w.ok, w.failed, inflight.requests[2], piece_s) == (0, 1, 0, [])  # nothing answered, nothing timed
    finally:
        await sender.stop()
    assert w.on_offer is None


@pytest.mark.slow
def test_warm_up_copies_cost_no_user_request_a_cold_prefill():
    """Shared-prefix traffic at half the knee, 400 requests (virtual time, seed 0, first tokens from the access
    log): the copies made by warm-ups against the same copies made by user requests (``warm_up: false``, the
    previous default): 16 cold requests against 32, TTFT p90 ~0.14 against ~0.44 s (at the knee 0.30 against
    0.49 s, but there the random tie-break alone moves a 400-request p90 by 0.1 s). The warm-ups are no trace
    request's: every record is one of the trace's."""
    import copy

    from e2e.bench import vcurve
    from pickers.profiles import BUILTIN_PROFILES

    def variant(warm: bool) -> dict:
        p = copy.deepcopy(BUILTIN_PROFILES["default"])
        for sc in p["scorers"]:
            if sc["type"] == "replicate":
                sc["warm_up"] = warm
        return {"profile": "default", "profiles": {"default": p}}

    half_knee = 8.672
    got = {name: vcurve.run_point("shared-prefix", name, 0, half_knee, 400, variants={name: variant(name == "warm")},
                                  as_aiperf_sends=True, access_log=True)
           for name in ("warm", "cold")}
    warm, cold = got["warm"], got["cold"]
    assert warm["completed"] == cold["completed"] == 400
    assert warm["cold"] < cold["cold"]  # the copies' cold prefills are the warm-ups', not the requests'
    assert warm["ttft_p90_s"] < 0.6 * cold["ttft_p90_s"]


def test_a_request_arriving_during_a_warm_up_waits_for_one_piece_not_the_whole_prefix():
    """The simulator's transport, one pod: a 4,096-token warm-up offered at t = 0, a user request of 256 tokens
    at 10 ms. In one piece the request waits for the whole prefill (0.17 s on an H100 8B); in pieces of 512 it
    is admitted after the piece in progress (0.05 s: vLLM takes waiting requests in arrival order, and the next piece
    arrives when the one before ends). The pieces build on each other: the copy is whole afterwards (a request
    with that prefix finds all 4,096 tokens cached) and the warm-up is reported once, ok."""
    from engine.sim.cluster import BaseRouter, ClusterSim, TraceRequest, fleet_from_flags, trace_prompts

    class OneWarmup(BaseRouter):
        name = "one-warm-up"

        def __init__(self, queue: Warmups, prefix: np.ndarray, piece_tokens: int) -> None:
            self.queue, self.prefix, self.piece_tokens = queue, prefix, piece_tokens
            self.cached: dict[int, int] = {}
            self.first: dict[int, float] = {}
            self.reports: list[tuple[str, bool]] = []

        def route(self, req, now):
            if req.request_id == "req-0":
                self.queue.offer(0, Endpoint("10.0.0.0:8000"), "m", 1, self.prefix, now, 0.3,
                                 piece_tokens=self.piece_tokens)
            return "10.0.0.0:8000", None

        def take_warmups(self):
            return self.queue.take()

        def warmup_done(self, request_id, ok):
            self.reports.append((request_id, ok))
            self.queue.done(request_id, ok)

        def on_first_token(self, req, at):
            self.first[int(req.request_id[4:])] = at

        def on_finished(self, req, usage, at):
            self.cached[int(req.request_id[4:])] = usage.cached_tokens

    trace = [TraceRequest(0, 0.0, 16, 2, [1]), TraceRequest(1, 0.01, 256, 2, [2] + list(range(100, 115))),
             TraceRequest(2, 5.0, 4096 + 64, 2, list(range(300, 300 + 256)) + [999])]
    prompts = list(trace_prompts(trace))
    prefix = prompts[2][1][:4096]

    def replay(piece_tokens: int) -> OneWarmup:
        router = OneWarmup(Warmups(InflightTracker(2)), prefix, piece_tokens)
        ClusterSim(fleet_from_flags(1, "H100", "8b"), router).run(iter(prompts))
        return router

    whole, pieces = replay(0), replay(512)
    for r in (whole, pieces):
        assert r.reports == [("kvswitch-warmup-0", True)] and len(r.queue) == 0
        assert r.cached[2] == 4096  # the copy is whole
    wait_whole, wait_pieces = whole.first[1] - 0.01, pieces.first[1] - 0.01
    assert wait_whole > 0.12 and wait_pieces < 0.4 * wait_whole, (wait_whole, wait_pieces)
