"""The installed cache-aware peers place as their emulations (engine/sim/cluster/peers.py) say they do.

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
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from e2e.bench.procs import tail
from e2e.bench.routers import make_router
from e2e.support.ports import free_ports
from engine.sim.cluster.peers import SGLANG_CACHE_AWARE, VLLM_CACHE_AWARE, CacheAwareParams, CacheAwareRouter
from engine.sim.cluster.routers import ClusterRequest
from pickers.types import Endpoint, Usage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKERS = 4
# the installed router (as e2e.bench.routers names it) -> its emulation's name and parameters
EMULATIONS: dict[str, tuple[str, CacheAwareParams]] = {
    "sglang-router:cache_aware": ("sglang:cache_aware", SGLANG_CACHE_AWARE),
    "vllm-router:cache_aware": ("vllm:cache_aware", VLLM_CACHE_AWARE),
}


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

        async def completions(req: web.Request) -> web.StreamResponse:
            prompt = (await req.json())["prompt"]
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
                        web.post("/v1/completions/render", render)])
        return app

    async def wait_arrival(self, prompt: str) -> int:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: prompt in self.arrivals), 20)
        return self.arrivals[prompt]


def _fresh(n: int, rng: random.Random) -> str:
    """A prompt that shares no prefix worth the name with any other (27 letters: ~1 in 27 share a first one)."""
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


@pytest.fixture(params=list(EMULATIONS))
async def placed(request: pytest.FixtureRequest, peers: None,
                 tmp_path: Path) -> AsyncIterator[tuple[StandIns, str, str]]:
    """The stand-ins behind a peer as the benchmark starts it (``make_router``: its flags, its own process
    group, ready once a completion goes through), every worker registered: (stand-ins, URL, router name)."""
    stand_ins = StandIns()
    router = make_router(request.param, tmp_path)
    runners = []
    try:
        ports = free_ports(WORKERS)
        for i, port in enumerate(ports):
            runner = web.AppRunner(stand_ins.app(i))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        addresses = [f"127.0.0.1:{p}" for p in ports]
        fleet = StandInFleet([f"http://{a}" for a in addresses], addresses, [""] * WORKERS, ["both"] * WORKERS)
        url = await asyncio.to_thread(router.start, fleet)  # blocking: the stand-ins answer on this loop
        async with aiohttp.ClientSession() as http:
            for _ in range(150):  # it registers its workers in the background, answering before all are in
                if len(await _router_loads(http, url)) == WORKERS:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail(f"{request.param} never listed its {WORKERS} workers healthy:\n"
                            + tail(router.procs[-1].log))
        yield stand_ins, url, request.param
    finally:
        await asyncio.to_thread(router.stop)
        for runner in runners:
            await runner.cleanup()


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

    async def send(self, prompt: str) -> int:
        """A request that finishes at once; the worker it reached."""
        self.events += [("route", prompt), ("finish", prompt)]
        await _send(self.http, self.url, prompt, in_flight_after=len(self.tasks))
        return self.stand_ins.arrivals[prompt]

    async def hold(self, prompt: str) -> int:
        """A stream held open on its worker until released; the worker it reached."""
        self.events.append(("route", prompt))
        self.stand_ins.holds[prompt] = asyncio.Event()
        self.tasks[prompt] = asyncio.create_task(_send(self.http, self.url, prompt))
        return await self.stand_ins.wait_arrival(prompt)

    async def release(self) -> None:
        for prompt in self.tasks:
            self.events.append(("finish", prompt))
            self.stand_ins.holds[prompt].set()
        await asyncio.gather(*self.tasks.values())
        self.tasks.clear()


def _emulated(router: str, events: list[tuple[str, str]]) -> dict[str, int]:
    """The same events through the router's emulation, a character a token: worker per prompt."""
    name, params = EMULATIONS[router]
    emulation = CacheAwareRouter([Endpoint(f"10.0.0.{i + 1}:8000") for i in range(WORKERS)], params, name)
    requests: dict[str, ClusterRequest] = {}
    placed: dict[str, int] = {}
    for kind, prompt in events:
        if kind == "route":
            tokens = np.frombuffer(prompt.encode(), dtype=np.uint8).astype(np.uint32)
            requests[prompt] = ClusterRequest(f"r{len(requests)}", 0.0, tokens, 1)
            address, _ = emulation.route(requests[prompt], 0.0)
            placed[prompt] = emulation.index[address]
        else:
            emulation.on_finished(requests[prompt], Usage(), 0.0)
    return placed


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

    # The emulation, given the same events, places every prompt alike up to the workers' names (the router's
    # tie goes to a worker of its own choosing; the emulation's to the first).
    emulated = _emulated(router, script.events)
    pairs = {(stand_ins.arrivals[p], emulated[p]) for p in emulated}
    assert len(pairs) == len({real for real, _ in pairs}) == len({emu for _, emu in pairs}), sorted(pairs)
