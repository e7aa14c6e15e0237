"""The installed peers (cache_aware and kv_aware) place as their emulations (engine/sim/cluster/peers.py) say.

The virtual-time curves judge kvswitch against emulations of the peers, so an emulation that follows a rule
the installed router does not would move the bar. This starts the real ``sglang-router`` 0.3.2 and
``vllm-router`` 0.1.17 (cache_aware, the benchmark's flags) in front of four stand-in workers that record
which worker each prompt reached and hold streams open on command, and checks each rule the emulations
implement: a prompt that matches more than 0.3 of what a worker was sent goes there, even while it is the
busiest; a prompt that matches nothing goes to the least loaded worker (in-flight requests, streams
included), ties always to the same worker, however much prompt that worker was sent before. The last is where
the routers and sgl-router's earlier rule (the worker with the smallest tree, kept as the ``tree:smallest``
baseline) part.

vllm-router routes on token ids that it asks the worker for (vLLM's Renderer API, ``POST
/v1/completions/render``, which the simulated pods serve); without it, it matches nothing and every prompt is
a low match. The stand-ins render a prompt as its bytes, the emulations' one character a token.

vllm-router's kv_aware (its rule read from the binary: engine/sim/cluster/peers.py) is held the same way,
with the stand-ins publishing KV events on vLLM's default topic as each prompt arrives: a cached prefix is
followed to its owner, and each request in flight there multiplies the owner's cost until an idle worker
is cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from e2e.bench.fleet import VLLM_DEFAULT_KV_TOPIC
from e2e.bench.procs import tail
from e2e.bench.routers import Router, make_router
from e2e.support.ports import free_ports
from engine.kvcache.events import BlockStored
from engine.kvcache.hashing import hash_blocks
from engine.sim.cluster.peers import KvAwareRouter, make_peer
from engine.sim.cluster.routers import ClusterRequest
from engine.sim.kvevents import KVEventPublisher
from pickers.types import Endpoint, Usage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKERS = 4
BLOCK = 16  # tokens per KV block: the stand-ins' cache and kv_aware's --kv-event-block-size
# the installed router (as e2e.bench.routers names it) -> its emulation (engine.sim.cluster.peers.make_peer)
EMULATIONS = {"sglang-router:cache_aware": "sglang:cache_aware", "vllm-router:cache_aware": "vllm:cache_aware",
              "vllm-router:kv_aware": "vllm:kv_aware"}
CACHE_AWARE = [r for r in EMULATIONS if r.endswith(":cache_aware")]


@dataclass(slots=True)
class StandInFleet:
    """The fleet as the benchmark's routers read it (``e2e.bench.routers.FleetView``)."""

    urls: list[str]
    addresses: list[str]
    kv_event_endpoints: list[str]
    roles: list[str]
    model: str = "m"
    accelerator: str = "L40S"
    model_profile: str = "8b"


@dataclass(slots=True)
class StandIns:
    """Four OpenAI-style completion servers: which worker got each prompt, and streams held until released."""

    arrivals: dict[str, int] = field(default_factory=dict)  # prompt -> worker index
    in_flight: list[int] = field(default_factory=lambda: [0] * WORKERS)
    holds: dict[str, asyncio.Event] = field(default_factory=dict)  # prompt -> released when set
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    # with kv_aware: one publisher per worker, on vLLM's default topic; a prompt's full blocks are stored
    # (BlockStored) as it arrives, as an engine whose prefill is instant would
    kv_publishers: list[KVEventPublisher] = field(default_factory=list)

    def app(self, index: int) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def render(req: web.Request) -> web.Response:
            """vLLM's Renderer API for a completion: the prompt's token ids (here its bytes)."""
            body = await req.json()
            return web.json_response([{
                "request_id": "cmpl-stand-in", "token_ids": list(body["prompt"].encode()), "features": None,
                "sampling_params": {"max_tokens": body.get("max_tokens", 16)}, "model": body["model"],
                "stream": body.get("stream", False), "stream_options": None, "cache_salt": None, "priority": 0,
                "kv_transfer_params": None}])

        async def metrics(_: web.Request) -> web.Response:  # the block size the benchmark tells kv_aware
            return web.Response(text=f'vllm:cache_config_info{{block_size="{BLOCK}"}} 1.0\n')

        async def completions(req: web.Request) -> web.StreamResponse:
            prompt = (await req.json())["prompt"]
            if self.kv_publishers:
                tokens = list(prompt.encode())[: len(prompt) // BLOCK * BLOCK]
                if tokens:
                    self.kv_publishers[index].publish([BlockStored(hash_blocks(tokens, BLOCK), None, tokens, BLOCK)])
            self.in_flight[index] += 1
            async with self.arrived:
                self.arrivals[prompt] = index
                self.arrived.notify_all()
            try:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(req)
                await resp.write(b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n')
                if prompt in self.holds:
                    await self.holds[prompt].wait()
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            finally:
                self.in_flight[index] -= 1

        app = web.Application(client_max_size=1 << 22)
        app.add_routes([web.get("/health", health), web.get("/v1/models", models),
                        web.post("/v1/completions", completions),
                        web.post("/v1/completions/render", render), web.get("/metrics", metrics)])
        return app

    async def wait_arrival(self, prompt: str) -> int:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: prompt in self.arrivals), 20)
        return self.arrivals[prompt]


def _fresh(n: int, rng: random.Random) -> str:
    """A prompt that shares no prefix worth the name with any other (27 letters: ~1 in 27 share a first one)."""
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


@contextlib.asynccontextmanager
async def _placed(router_name: str, workdir: Path,
                  kv_events: bool = False) -> AsyncIterator[tuple[StandIns, str, Router]]:
    """The stand-ins behind a peer as the benchmark starts it (``make_router``: its flags, its own process
    group, ready once a completion goes through), every worker registered: (stand-ins, URL, router)."""
    stand_ins = StandIns()
    router = make_router(router_name, workdir)
    runners = []
    try:
        if kv_events:
            stand_ins.kv_publishers = [KVEventPublisher(topic=VLLM_DEFAULT_KV_TOPIC.encode()) for _ in range(WORKERS)]
        ports = free_ports(WORKERS)
        for i, port in enumerate(ports):
            runner = web.AppRunner(stand_ins.app(i))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        addresses = [f"127.0.0.1:{p}" for p in ports]
        endpoints = [pub.endpoint for pub in stand_ins.kv_publishers] or [""] * WORKERS
        fleet = StandInFleet([f"http://{a}" for a in addresses], addresses, endpoints, ["both"] * WORKERS)
        url = await asyncio.to_thread(router.start, fleet)  # blocking: the stand-ins answer on this loop
        async with aiohttp.ClientSession() as http:
            for _ in range(150):  # it registers its workers in the background, answering before all are in
                if len(await _router_loads(http, url)) == WORKERS:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail(f"{router_name} never listed its {WORKERS} workers healthy:\n"
                            + tail(router.procs[-1].log))
        yield stand_ins, url, router
    finally:
        await asyncio.to_thread(router.stop)
        for runner in runners:
            await runner.cleanup()
        for pub in stand_ins.kv_publishers:
            await pub.close()


@pytest.fixture(params=CACHE_AWARE)
async def placed(request: pytest.FixtureRequest, peers: None,
                 tmp_path: Path) -> AsyncIterator[tuple[StandIns, str, str]]:
    """A cache-aware peer in front of the stand-ins: (stand-ins, URL, router name)."""
    async with _placed(request.param, tmp_path) as (stand_ins, url, _):
        yield stand_ins, url, request.param


@pytest.fixture
async def kv_placed(peers: None, tmp_path: Path) -> AsyncIterator[tuple[StandIns, str, Router]]:
    """vllm-router kv_aware in front of the stand-ins, subscribed to their KV events."""
    async with _placed("vllm-router:kv_aware", tmp_path, kv_events=True) as placed:
        yield placed


async def _router_loads(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """The router's own in-flight count per healthy worker (its ``GET /workers``)."""
    async with http.get(f"{url}/workers") as r:
        r.raise_for_status()
        return {w["url"]: w["load"] for w in (await r.json())["workers"] if w["is_healthy"]}


async def _settled(http: aiohttp.ClientSession, url: str, in_flight: int) -> None:
    """Wait until the router counts ``in_flight`` requests: it takes a finished one off after the client has
    read its end, so the next request must not race that bookkeeping."""
    for _ in range(100):
        if sum((await _router_loads(http, url)).values()) == in_flight:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the router's load never came to {in_flight}: {await _router_loads(http, url)}")


async def _send(http: aiohttp.ClientSession, url: str, prompt: str, in_flight_after: int = 0) -> None:
    """One streamed completion through the router, read to its end."""
    body = {"model": "m", "prompt": prompt, "max_tokens": 1, "stream": True}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()
    await _settled(http, url, in_flight_after)


@dataclass(slots=True)
class Script:
    """Drives the real router and records what it did, to replay the same events in the emulation."""

    http: aiohttp.ClientSession
    url: str
    stand_ins: StandIns
    events: list[tuple[str, str]] = field(default_factory=list)  # ("route" | "finish", prompt)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # after each arrival: time for the router to take in what it learns asynchronously (the worker's KV
    # events, the first frame of a held stream); loopback delivers both in milliseconds
    settle_s: float = 0.0

    async def send(self, prompt: str) -> int:
        """A request that finishes at once; the worker it reached."""
        self.events += [("route", prompt), ("finish", prompt)]
        await _send(self.http, self.url, prompt, in_flight_after=len(self.tasks))
        await asyncio.sleep(self.settle_s)
        return self.stand_ins.arrivals[prompt]

    async def hold(self, prompt: str) -> int:
        """A stream held open on its worker until released (its first frame sent); the worker it reached."""
        self.events.append(("route", prompt))
        self.stand_ins.holds[prompt] = asyncio.Event()
        self.tasks[prompt] = asyncio.create_task(_send(self.http, self.url, prompt))
        worker = await self.stand_ins.wait_arrival(prompt)
        await asyncio.sleep(self.settle_s)
        return worker

    async def release(self) -> None:
        for prompt in self.tasks:
            self.events.append(("finish", prompt))
            self.stand_ins.holds[prompt].set()
        await asyncio.gather(*self.tasks.values())
        self.tasks.clear()


@dataclass(slots=True)
class _StandInCache:
    """What the kv_aware emulation reads of a pod's cache (``core.pool``): the blocks its stand-in stored."""

    block_size: int = BLOCK
    stored: set[int] = field(default_factory=set)

    def hash_tokens(self, tokens: np.ndarray) -> list[int]:
        return hash_blocks(tokens, self.block_size)

    def cached_block(self, block_hash: int) -> int | None:
        return 0 if block_hash in self.stored else None


@dataclass(slots=True)
class _StandInCore:
    pool: _StandInCache


@dataclass(slots=True)
class _StandInPod:
    name: str
    core: _StandInCore


def _emulated(router: str, events: list[tuple[str, str]]) -> dict[str, int]:
    """The same events through the router's emulation, a character a token: worker per prompt. As the
    stand-ins do, the chosen worker stores the prompt's full blocks and sends its first frame at once."""
    endpoints = [Endpoint(f"10.0.0.{i + 1}:8000") for i in range(WORKERS)]
    caches = [_StandInCache() for _ in range(WORKERS)]
    emulation = make_peer(EMULATIONS[router], endpoints)
    if isinstance(emulation, KvAwareRouter):  # it reads each pod's cache, as ClusterSim attaches them
        emulation.attach([_StandInPod(e.address, _StandInCore(c)) for e, c in zip(endpoints, caches)])
    requests: dict[str, ClusterRequest] = {}
    placed: dict[str, int] = {}
    for kind, prompt in events:
        if kind == "route":
            tokens = np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.uint32)
            requests[prompt] = ClusterRequest(f"r{len(requests)}", 0.0, tokens, 1)
            route = emulation.route(requests[prompt], 0.0)
            assert route is not None
            placed[prompt] = i = emulation.index[route[0]]
            caches[i].stored.update(caches[i].hash_tokens(tokens[: len(tokens) // BLOCK * BLOCK]))
            emulation.on_first_token(requests[prompt], 0.0)
        else:
            emulation.on_finished(requests[prompt], Usage(), 0.0)
    return placed


def _alike(stand_ins: StandIns, emulated: dict[str, int]) -> None:
    """Every prompt placed alike up to the workers' names (the router's tie goes to a worker of its own
    choosing, the emulation's to the first): real and emulated workers pair one to one."""
    pairs = {(stand_ins.arrivals[p], emulated[p]) for p in emulated}
    assert len(pairs) == len({real for real, _ in pairs}) == len({emu for _, emu in pairs}), sorted(pairs)


async def test_the_peer_places_as_its_emulation(placed: tuple[StandIns, str, str]) -> None:
    stand_ins, url, router = placed
    rng = random.Random(5)
    async with aiohttp.ClientSession() as http:
        # the readiness probe's completions first: the emulation replays them too
        script = Script(http, url, stand_ins, [e for p in stand_ins.arrivals for e in (("route", p), ("finish", p))])
        # A prompt that matches nothing, every worker idle: the same worker each time (least loaded, ties
        # to one worker), though it was sent 8,000 characters and three others nothing. The smallest-tree
        # rule would send the second prompt elsewhere.
        fresh = [await script.send(_fresh(n, rng)) for n in (8000, 100, 3000, 100)]
        assert len(set(fresh)) == 1, fresh

        # A prompt held open on a worker; the same prompt and 100 more characters (0.98 matched) follows it
        # there while that worker is the only busy one (1 against 0: balanced by 64 / 1.5x).
        held = _fresh(4000, rng)
        w_held = await script.hold(held)
        assert await script.send(held + _fresh(100, rng)) == w_held
        await script.release()

        # Three streams held open take three different workers (each the least loaded when it came); a
        # prompt that matches nothing then goes to the fourth, the only idle one.
        busy = {await script.hold(_fresh(300, rng)) for _ in range(3)}
        assert len(busy) == 3 and sorted(stand_ins.in_flight) == [0, 1, 1, 1]
        assert await script.send(_fresh(300, rng)) not in busy
        await script.release()
    assert stand_ins.in_flight == [0] * WORKERS

    # The emulation, given the same events, places every prompt alike.
    _alike(stand_ins, _emulated(router, script.events))


async def test_vllm_router_kv_aware_places_as_its_emulation(kv_placed: tuple[StandIns, str, Router]) -> None:
    """kv_aware's cost, (new prefill tokens + prefill tokens in flight) x (requests in flight + 1), lowest
    wins: the new tokens are the prompt less the worker's cached prefix as its KV events report it."""
    stand_ins, url, router = kv_placed
    rng = random.Random(7)
    async with aiohttp.ClientSession() as http:
        script = Script(http, url, stand_ins, [e for p in stand_ins.arrivals for e in (("route", p), ("finish", p))],
                        settle_s=0.5)
        # Cold prompts, every worker idle: n x 1 everywhere, the tie always to the same worker.
        fresh = [await script.send(_fresh(n, rng)) for n in (3000, 100, 800)]
        assert len(set(fresh)) == 1, fresh
        ties = fresh[0]

        # That worker busy with a stream: a 400-character prompt costs 400 x 2 there, 400 x 1 elsewhere.
        assert await script.hold(_fresh(300, rng)) == ties
        shared = _fresh(400, rng)
        owner = await script.send(shared)
        assert owner != ties
        await script.release()

        # Every worker idle again: the same 400 characters (25 blocks) and 120 new ones follow the blocks to
        # their owner, 120 new tokens x 1 against 520 x 1 at the worker that takes the ties. Each stream held
        # there multiplies the owner's cost: 120 x (k + 1) stays below 520 for k = 0..3; the fifth (600)
        # goes elsewhere. A longest-match rule would keep all five; least loaded would move the second.
        places = [await script.hold(shared + _fresh(120, rng)) for _ in range(5)]
        assert places[:4] == [owner] * 4 and places[4] != owner, (owner, places)
        await script.release()
    assert stand_ins.in_flight == [0] * WORKERS
    _alike(stand_ins, _emulated("vllm-router:kv_aware", script.events))
    # what the benchmark records of each kv_aware run (Router.kv_lookups): the five prompts behind the 400
    # shared characters found them in the router's index; the five prompts before them (and the readiness
    # probe's) did not
    lookups = router.kv_lookups()
    assert lookups.get("hit") == 5 and lookups.get("miss", 0) >= 5, lookups
