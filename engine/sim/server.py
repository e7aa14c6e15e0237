"""One simulated vLLM pod in real time: an aiohttp app in front of an EngineCore.

Endpoints (as vLLM): POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health, GET /metrics, POST /reset_prefix_cache. Simulator-only: GET/POST /sim/faults,
POST /sim/kv/release ({"block_ids": [...]}: the decode side pulled held prefill blocks), GET /sim/state.

The driver is one asyncio task per pod: ``result = group.step(sim_now)``; sleep ``duration *
time_scale``; publish the step's KV events; deliver the new tokens.

A pod with ``spec.dp_size`` N > 1 is vLLM's data-parallel deployment (``--data-parallel-size N`` with expert
parallelism): N engine cores (own scheduler, waiting queue and KV cache each) stepping together behind the one
port (engine.sim.dpgroup). A request's ``X-data-parallel-rank`` header picks the rank (a value that is not an
integer is ignored, one out of range is a 400, as vLLM does); without it the pod balances as vLLM does.
Metrics carry ``engine="<rank>"`` per rank, and rank r publishes its KV events on its own socket (the
configured port + r, or a free port when the configured one is 0) with ``data_parallel_rank`` = r in every
batch. The pod's simulated clock advances
by step durations while busy (so Python overhead does not count as GPU time), and catches up with
wall time / time_scale when idle. The driver sleeps on an asyncio.Event while there is no work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from typing import Any

import aiohttp
import msgspec
import orjson
from aiohttp import web

from engine import VLLM_LISTEN_BACKLOG
from engine.costmodel import CostModel, Deployment
from engine.costmodel.dataparallel import DataParallelCost
from engine.sim import openai_api as api
from engine.sim.core import EngineConfig, EngineCore, RequestOutput, SimRequest
from engine.sim.dpgroup import DPGroup
from engine.sim.faults import Faults, FaultUpdate
from engine.sim.kvevents import KVEventPublisher
from engine.sim.metrics import PodMetrics
from engine.sim.spec import PodSpec, speculative_for
from engine.tokens.tokenizer import BuiltinTokenizer, Tokenizer

log = logging.getLogger("kvswitch.sim")

MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON = "application/json"


def build_cost(spec: PodSpec) -> CostModel:
    """The cost model of one engine core of the pod (one rank of a data-parallel pod)."""
    return build_group_cost(spec).rank


def build_group_cost(spec: PodSpec) -> DataParallelCost:
    dep = None
    if spec.dp_size > 1:
        tp = spec.tp or 1
        dep = Deployment(tp=tp, ep=spec.ep or spec.dp_size * tp)
    elif spec.tp is not None or spec.ep is not None:
        dep = Deployment(tp=spec.tp or 1, ep=spec.ep or 1)
    return DataParallelCost(spec.model_profile, spec.accelerator, dep, dp=spec.dp_size)


RANK_HEADER = "X-data-parallel-rank"


class _Stream:
    """Outputs of one in-flight request, bounded by its max_tokens."""

    __slots__ = ("queue", "prev_time", "rank")

    def __init__(self, rank: int = 0) -> None:
        self.queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()
        self.prev_time: float | None = None
        self.rank = rank


class SimPod:
    """One pod: spec, engine core, KV event publisher, faults, metrics and HTTP listener."""

    def __init__(
        self,
        spec: PodSpec,
        tokenizer: Tokenizer | None = None,
        time_scale: float = 1.0,
        peers: dict[str, SimPod] | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.spec = spec
        self.tokenizer = tokenizer or BuiltinTokenizer()
        self.time_scale = time_scale
        self.peers = peers if peers is not None else {}  # engine id -> pod, for in-process KV release
        if spec.dp_size < 1:
            raise ValueError("dp_size must be at least 1")
        self.group_cost = build_group_cost(spec)
        self.cost = self.group_cost.rank
        self.faults = Faults(spec.seed)
        self.publishers: list[KVEventPublisher] = []  # one per rank
        self.group: DPGroup = self._new_group()
        self.metrics = self._new_metrics()
        self.port = spec.port
        self.fingerprint = f"vllm-0.32.0-{uuid.uuid4().hex[:8]}"
        self.crashed = False
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bg: set[asyncio.Task] = set()
        self._t0 = 0.0
        self._sim = 0.0
        self._busy = False

    # ---- construction ----------------------------------------------------------------------------
    def _new_group(self) -> DPGroup:
        s = self.spec
        cfg = EngineConfig(
            block_size=s.block_size, num_blocks=s.num_blocks, max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=s.max_model_len, role=s.role,
            link=s.link, kv_transfer_timeout_s=s.kv_transfer_timeout_s,
            vocab_size=self.tokenizer.vocab_size, hash_seed=s.seed, remote_host=s.host,
            remote_port=self.port if hasattr(self, "port") else s.port,
            speculative=speculative_for(s.model_profile) if s.speculative else None,
        )
        old = getattr(self, "group", None)
        if old is not None:
            for c in old.cores:
                self.peers.pop(c.engine_id, None)
        group = DPGroup(self.group_cost, cfg)
        for core in group.cores:
            core.on_kv_pulled = self._on_kv_pulled
            self.peers[core.engine_id] = self
        return group

    @property
    def core(self) -> EngineCore:
        """Rank 0's engine core (the only one of a pod without data parallelism)."""
        return self.group.cores[0]

    @property
    def publisher(self) -> KVEventPublisher | None:
        """Rank 0's KV event publisher."""
        return self.publishers[0] if self.publishers else None

    @property
    def dp_size(self) -> int:
        return self.group.dp

    def _new_metrics(self) -> PodMetrics:
        c = self.core
        info = {
            "block_size": str(c.block_size), "num_gpu_blocks": str(c.num_blocks), "num_cpu_blocks": "0",
            "enable_prefix_caching": "True", "prefix_caching_hash_algo": "sha256",
            "cache_dtype": "auto", "gpu_memory_utilization": "0.9", "kv_sharing_fast_prefill": "False",
        }
        if self.dp_size == 1:
            return PodMetrics(self.spec.model_name, info, str(self.spec.dp_rank))
        return PodMetrics(self.spec.model_name, info, engines=[str(r) for r in range(self.dp_size)])

    def _update_metrics(self) -> None:
        for r, core in enumerate(self.group.cores):
            self.metrics.update(core.stats(), r)

    # ---- addresses -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return f"{self.spec.host}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def kv_events_endpoints(self) -> list[str]:
        """Every rank's KV event endpoint, by rank."""
        return [p.endpoint for p in self.publishers]

    @property
    def role(self) -> str:
        return self.spec.role

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        s = self.spec
        if s.kv_events_port is not None and not self.publishers:
            for r in range(self.dp_size):
                # vLLM offsets the port by the rank; a port of 0 stays 0 (a free one per rank)
                port = (s.kv_events_port + r) if s.kv_events_port else "*"
                replay = None
                if s.kv_events_replay_port is not None:
                    replay = f"tcp://{s.host}:{(s.kv_events_replay_port + r) if s.kv_events_replay_port else '*'}"
                pub = KVEventPublisher(
                    f"tcp://{s.host}:{port}", s.kv_events_topic.encode(), s.event_format,
                    s.dp_rank if self.dp_size == 1 else r, replay_endpoint=replay,
                )
                self.publishers.append(pub)
                pub.start()
        self._session = aiohttp.ClientSession()
        await self._listen()
        for core in self.group.cores:
            core.config.remote_port = self.port
        self._driver = loop.create_task(self._drive(), name=f"sim-driver-{s.name}")

    async def _listen(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/completions/render", self._render_completions),
            web.post("/v1/chat/completions/render", self._render_chat),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/version", self._version),
            web.get("/metrics", self._metrics),
            web.post("/reset_prefix_cache", self._reset_prefix_cache),
            web.get("/sim/faults", self._get_faults),
            web.post("/sim/faults", self._post_faults),
            web.post("/sim/kv/release", self._kv_release),
            web.get("/sim/state", self._state),
        ])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.spec.host, self.port, reuse_address=True,
                                 backlog=VLLM_LISTEN_BACKLOG)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _unlisten(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = self._site = None

    async def stop(self) -> None:
        for t in list(self._bg):
            t.cancel()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        self._fail_streams()
        await self._unlisten()
        if self._session is not None:
            await self._session.close()
            self._session = None
        for pub in self.publishers:
            await pub.close()
        self.publishers = []
        for core in self.group.cores:
            self.peers.pop(core.engine_id, None)

    async def crash(self) -> None:
        """Refuse connections (the listener closes), drop every in-flight request and stop the engine."""
        if self.crashed:
            return
        self.crashed = True
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        self._fail_streams()
        await self._unlisten()

    async def restart(self) -> None:
        """Come back as a fresh engine: empty cache, KV event sequence from 0, same ports."""
        if not self.crashed:
            await self.crash()
        self.group = self._new_group()
        for core in self.group.cores:
            core.config.remote_port = self.port
        self.metrics = self._new_metrics()  # a new process: counters start again from 0
        for pub in self.publishers:
            pub.restart()
        await self._listen()
        self.crashed = False
        self._busy = False
        self._driver = asyncio.get_running_loop().create_task(self._drive(), name=f"sim-driver-{self.name}")

    def _fail_streams(self) -> None:
        """End every in-flight request: its handler sees None, and the engine forgets it."""
        for rid, st in self._streams.items():
            st.queue.put_nowait(None)
            self.group.abort(rid)
        self._streams.clear()

    # ---- clock and driver ------------------------------------------------------------------------
    def sim_now(self) -> float:
        """The pod's simulated time: the current step's start while busy, scaled wall time when idle."""
        if self._busy:
            return self._sim
        return max(self._sim, (asyncio.get_running_loop().time() - self._t0) / self.time_scale)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.time_scale
        while True:
            if not self._busy:
                self._sim = self.sim_now()
                self._busy = True
            group = self.group
            res = group.step(self._sim)
            for rank, events in res.events():
                self._publish(events, rank)
            if res.idle:
                # Nothing schedulable: sleep until a request arrives, blocks are released, or the
                # core's next timer (a KV pull completing, held blocks expiring).
                self._busy = False
                self._update_metrics()
                self._wake.clear()
                nxt = group.next_event_time()
                timeout = None if nxt is None else max(0.0, (nxt - self.sim_now()) * scale)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            self._sim = res.end
            delay = self._t0 + self._sim * scale - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            self._deliver(res.outputs())
            self._update_metrics()

    def _publish(self, events: list, rank: int = 0) -> None:
        if self.publishers and self.faults.config.events_enabled:
            self.publishers[rank].publish(events)

    def _deliver(self, outputs: list[tuple[int, RequestOutput]]) -> None:
        m = self.metrics
        for rank, out in outputs:
            st = self._streams.get(out.request_id)
            if st is None:
                continue
            m.observe_token(out, st.prev_time, rank)
            st.prev_time = out.time
            if out.finished:
                m.observe_finished(out, rank)
                del self._streams[out.request_id]
            st.queue.put_nowait(out)

    def _on_kv_pulled(self, params: dict[str, Any]) -> None:
        """Our decode request pulled a prefill pod's blocks: tell that pod to free them."""
        block_ids = params.get("remote_block_ids") or []
        peer = self.peers.get(str(params.get("remote_engine_id")))
        if peer is not None:
            peer.release_remote(block_ids)
            return
        host, port = params.get("remote_host"), params.get("remote_port")
        if host and port and self._session is not None:
            t = asyncio.get_running_loop().create_task(self._release_http(f"http://{host}:{port}", params))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    async def _release_http(self, base: str, params: dict[str, Any]) -> None:
        assert self._session is not None
        body = {"engine_id": params.get("remote_engine_id"), "block_ids": params.get("remote_block_ids")}
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._session.post(f"{base}/sim/kv/release", json=body,
                                          timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()

    # ---- handlers --------------------------------------------------------------------------------
    def _error(self, exc: api.APIError) -> web.Response:
        return web.Response(status=exc.status, body=exc.body(), content_type=_JSON)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        fc = self.faults.config
        if fc.latency_s > 0:
            await asyncio.sleep(fc.latency_s * self.time_scale)
        if self.faults.should_fail():
            return self._error(api.APIError(fc.error_status, fc.error_message))
        try:
            raw = await request.read()
            p = api.parse_request(raw, chat, self.tokenizer, (self.spec.model_name,), self.core.max_model_len)
        except api.APIError as exc:
            return self._error(exc)
        except web.HTTPRequestEntityTooLarge:
            return self._error(api.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))
        if len(self._streams) >= self.spec.max_pending:
            return self._error(api.APIError(503, "the server is overloaded; try again later"))
        header_id = request.headers.get("X-Request-Id")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{header_id or uuid.uuid4().hex[:16]}"
        internal = uuid.uuid4().hex
        eos_at = self.spec.eos_after
        sreq = SimRequest(
            internal, p.prompt_ids, p.max_tokens, arrival=self.sim_now(), min_tokens=p.min_tokens,
            ignore_eos=p.ignore_eos, eos_at=eos_at, kv_transfer_params=p.kv_transfer_params,
            seed=p.seed if p.seed is not None else None,
        )
        try:
            rank = self.group.add_request(sreq, _rank_header(request), self.sim_now())
        except ValueError as exc:
            return self._error(api.APIError(400, str(exc)))
        st = _Stream(rank)
        self._streams[internal] = st
        self._wake.set()
        created = api.now_s()
        try:
            if p.stream:
                return await self._stream(request, p, st, rid, created)
            return await self._collect(p, st, rid, created)
        finally:
            if internal in self._streams:  # client went away or the pod crashed: free the engine side
                del self._streams[internal]
                if self.group.abort(internal):
                    self._wake.set()

    async def _collect(self, p: api.ParsedRequest, st: _Stream, rid: str, created: int) -> web.Response:
        ids: list[int] = []
        while True:
            out = await st.queue.get()
            if out is None:
                return self._error(api.APIError(503, "the engine stopped"))
            ids.extend(out.new_token_ids)
            if out.finished:
                break
        text = self.tokenizer.decode(ids)
        u = api.usage(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens, p.chat, False)
        build = api.chat_response if p.chat else api.completion_response
        body = build(rid, created, p.model, text, out.finish_reason, u, out.kv_transfer_params, self.fingerprint)
        return web.Response(body=orjson.dumps(body), content_type=_JSON)

    async def _stream(
        self, request: web.Request, p: api.ParsedRequest, st: _Stream, rid: str, created: int
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        model, decode = p.model, self.tokenizer.decode
        fp = self.fingerprint
        if p.chat:
            await resp.write(api.chat_role_chunk(rid, created, model))
        out: RequestOutput | None = None
        while True:
            out = await st.queue.get()
            if out is None:
                break  # the pod crashed: end the stream without [DONE], as a dropped connection would
            text = decode(out.new_token_ids)
            fin = out.finish_reason if out.finished else None
            last_fp = fp if out.finished and not p.include_usage else None
            if p.chat:
                chunk = api.chat_chunk(rid, created, model, text, fin, last_fp)
            else:
                chunk = api.completion_chunk(rid, created, model, text, fin, last_fp)
            await resp.write(chunk)
            if out.finished:
                break
        if out is not None and out.finished:
            if p.include_usage:
                u = api.usage(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens, p.chat, True)
                await resp.write(api.usage_chunk(rid, created, model, p.chat, u, fp))
            await resp.write(api.SSE_DONE)
        await resp.write_eof()
        return resp

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        """vLLM's Renderer API (served by ``vllm serve --enable-scale-out``): the request as token ids.

        Routers that route on tokens (vllm-router 0.1.17 cache_aware/kv_aware) call it on the worker; the
        ids are the very ones the pod would schedule. Completions answer a list, chat one object.
        """
        try:
            raw = await request.read()
            p = api.parse_request(raw, chat, self.tokenizer, (self.spec.model_name,), self.core.max_model_len)
        except api.APIError as exc:
            return self._error(exc)
        except web.HTTPRequestEntityTooLarge:
            return self._error(api.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))
        item = {"request_id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}",
                "token_ids": p.prompt_ids.tolist(), "features": None,
                "sampling_params": {"max_tokens": p.max_tokens, "min_tokens": p.min_tokens,
                                    "ignore_eos": p.ignore_eos, "seed": p.seed},
                "model": p.model, "stream": p.stream, "stream_options": None, "cache_salt": None,
                "priority": 0, "kv_transfer_params": p.kv_transfer_params}
        return web.Response(body=orjson.dumps(item if chat else [item]), content_type=_JSON)

    async def _render_completions(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def _models(self, request: web.Request) -> web.Response:
        m = self.spec.model_name
        body = {"object": "list", "data": [{
            "id": m, "object": "model", "created": api.now_s(), "owned_by": "vllm", "root": m, "parent": None,
            "max_model_len": self.core.max_model_len, "permission": [],
        }]}
        return web.Response(body=orjson.dumps(body), content_type=_JSON)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"version":"0.32.0"}', content_type=_JSON)

    async def _metrics(self, request: web.Request) -> web.Response:
        """The page, or with ``name[]`` parameters only those samples' families (prometheus_client's filter).

        vLLM 0.32 answers GET /metrics from its instrumentator route, which ignores the filter; it renders the
        page in the API server process, though, so a scrape never delays a GPU step. Here the page is rendered on
        the loop that runs the pods' steps: the full page costs ~2.2 ms of it, the picker's families ~0.18 ms,
        and at the picker's 20 scrapes a second per pod the full pages took 8.2 s of the fleet process's CPU in
        a 24 s benchmark run (4 pods) against ~3 s filtered, slowing the very steps being measured."""
        self._update_metrics()
        names = request.query.getall("name[]", [])
        return web.Response(body=self.metrics.render(names), content_type="text/plain", charset="utf-8")

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.reset_prefix_cache()
        return web.Response(body=b'{"success":true}', content_type=_JSON)

    def reset_prefix_cache(self) -> None:
        for rank, core in enumerate(self.group.cores):
            self._publish(core.reset_prefix_cache(), rank)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.faults.config), content_type=_JSON)

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            upd = msgspec.json.decode(await request.read(), type=FaultUpdate)
            if upd.reset:
                self.faults.reset()
            changes = {k: v for k, v in msgspec.structs.asdict(upd).items()
                       if k not in ("crash_for_s", "reset") and v is not None}
            cfg = self.faults.update(**changes)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return self._error(api.APIError(400, f"bad fault settings: {exc}"))
        if upd.crash_for_s is not None:
            self._spawn(self._crash_for(upd.crash_for_s))
        return web.Response(body=msgspec.json.encode(cfg), content_type=_JSON)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _crash_for(self, seconds: float) -> None:
        await asyncio.sleep(0.05)  # let the admin response go out first
        await self.crash()
        await asyncio.sleep(max(0.0, seconds))
        await self.restart()

    async def _kv_release(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            ids = body["block_ids"]
            if not isinstance(ids, list) or not all(isinstance(b, int) for b in ids):
                raise ValueError("block_ids must be a list of integers")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return self._error(api.APIError(400, f"bad release request: {exc}"))
        released = self.release_remote(ids)
        return web.Response(body=orjson.dumps({"released": released}), content_type=_JSON)

    def release_remote(self, block_ids: list[int]) -> bool:
        """Free held prefill blocks (the decode side pulled them) and let waiting requests use them."""
        released = self.group.release_remote(block_ids)
        if released:
            self._wake.set()
        return released

    async def _state(self, request: web.Request) -> web.Response:
        s = self.core.stats()
        body = dataclasses.asdict(s)
        body["dp_size"] = self.dp_size
        body["ranks"] = [dataclasses.asdict(c.stats()) | {"engine_id": c.engine_id,
                                                           "requests": self.group.requests[r]}
                         for r, c in enumerate(self.group.cores)]
        body.update({"name": self.name, "role": self.role, "engine_id": self.core.engine_id,
                     "sim_now": self.sim_now(), "num_blocks": self.core.num_blocks,
                     "block_size": self.core.block_size, "accelerator": self.spec.accelerator,
                     "model_profile": self.spec.model_profile})
        return web.Response(body=orjson.dumps(body), content_type=_JSON)


def _rank_header(request: web.Request) -> int | None:
    """The rank a request asks for, as vLLM reads it: a missing or non-integer header means none."""
    raw = request.headers.get(RANK_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


__all__ = ["RANK_HEADER", "SimPod", "build_cost", "build_group_cost"]
