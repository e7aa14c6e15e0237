"""EngineCore: a clock-agnostic continuous-batching engine with vLLM v1 scheduling semantics.

The core never reads a clock. The caller passes the current simulated time to ``step(now)``; the core
schedules one step, applies it at once and returns how long the step takes (from the cost model) and
what each request got. The caller makes the results visible at ``result.end`` (= now + duration):
the real-time driver (server.py) sleeps ``duration * time_scale`` and then delivers them; a
virtual-time simulator pushes an event at ``result.end``. The caller must not call ``step`` again
before ``result.end``.

API (the virtual-time cluster simulator depends on it)::

    core = EngineCore(cost: CostModel, config: EngineConfig = EngineConfig(), events=None)
        events(batch: list[KVEvent], ts: float) is called once per step that produced KV events
        (BlockStored / BlockRemoved / AllBlocksCleared from engine.sim.blockpool); the same batch is
        also in StepResult.events. EngineConfig(kv_events=False): no subscriber, no events are built
        (StepResult.events stays empty; scheduling and caching are the same).
    core.on_kv_pulled = callable(kv_transfer_params: dict) | None
        called when a do_remote_prefill request finished pulling its KV: the fleet calls the prefill
        pod's ``release_remote(params["remote_block_ids"])`` (in process, or POST /sim/kv/release).
    core.add_request(req: SimRequest) -> None          (raises ValueError on a bad request)
    core.step(now: float) -> StepResult
        StepResult.start, .duration, .end, .outputs: list[RequestOutput], .events, .idle,
        .num_new_tokens, .num_prefill_tokens, .num_decode_reqs.
        idle=True (duration 0) when nothing could be scheduled: wait for a new request or until
        ``next_event_time()``.
    core.next_event_time() -> float | None  earliest pending timer: a remote KV load that completes,
        or held prefill blocks that expire. The caller must call step() at that time even when
        has_work() is False.
    core.has_work() -> bool                 requests waiting or running (ready to schedule)
    core.abort(request_id) -> bool          frees its blocks; no output is produced for it
    core.release_remote(block_ids) -> bool  the decode side pulled held prefill blocks: free them
    core.reset_prefix_cache() -> None       forget cached hashes (AllBlocksCleared)
    core.stats() -> EngineStats             num_running, num_waiting, kv_usage, prefix_queries,
        prefix_hits, num_preemptions, prompt_tokens, generation_tokens, num_held_blocks

Scheduling (vLLM v1, chunked prefill always on): running requests first, in order, each gets what it
still needs (the rest of its prompt, or one decode token) within ``max_num_batched_tokens``; when the
pool is short of blocks the newest running request is preempted (recompute: its blocks are freed,
it goes to the front of the waiting queue). If nothing was preempted, waiting requests are admitted
in FCFS order while the token budget, ``max_num_seqs`` and free blocks allow; a new request first
takes the longest cached prefix (at most ``num_tokens - 1`` tokens, as vLLM recomputes the last
token). Full blocks are committed (hashed, BlockStored) when the step that computes their last tokens is
scheduled, output blocks included, as vLLM's ``allocate_slots`` caches them: a request admitted later in the
same step hits the blocks an earlier one is computing (two waiting requests with a new prefix compute it
once). Prefill/decode disaggregation follows NixlConnector: ``do_remote_decode`` (roles prefill/both)
finishes after the first token and holds all its blocks until ``release_remote`` or
``kv_transfer_timeout_s``; ``do_remote_prefill`` (roles decode/both) allocates blocks for the
prompt, charges ``cost.transfer_time(prompt tokens not cached locally, link)`` without occupying the
GPU, then commits the pulled blocks (BlockStored on this pod too) and recomputes only the last token.
"""

from __future__ import annotations

import random
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.costmodel import CostModel, prefill_pairs
from engine.costmodel.speculative import Speculative, draft_seconds
from engine.sim.blockpool import BlockPool, KVEvent, new_root_hash

ROLES = ("both", "prefill", "decode")

# Request states
WAITING = 0
RUNNING = 1
LOADING_REMOTE = 2
FINISHED = 3


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: cost.num_blocks(block_size)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model profile's, capped by the KV capacity
    role: str = "both"
    link: str = "rdma-400g"
    kv_transfer_timeout_s: float = 30.0
    vocab_size: int = 32000
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    hash_seed: int | None = None  # None: a random per-pod root hash, like vLLM without PYTHONHASHSEED
    remote_host: str = "127.0.0.1"  # what a prefill result advertises (the pod's address)
    remote_port: int = 0
    tp_size: int | None = None  # None: cost.deployment.tp
    kv_events: bool = True  # False: nobody subscribes to KV events; skip building them
    # True: the events are consumed in this process (virtual time), in the compact shapes BlockPool documents
    kv_events_in_process: bool = False
    # Speculative decoding: every decode step verifies 1 + k tokens per request (k lookahead slots of the token
    # budget and the KV blocks), after k draft forwards; each draft is accepted with probability
    # ``acceptance`` while the ones before it were (engine.costmodel.speculative).
    speculative: Speculative | None = None


@dataclass(slots=True)
class SimRequest:
    request_id: str
    prompt_token_ids: Sequence[int] | np.ndarray
    max_tokens: int
    arrival: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_at: int | None = None  # output length at which the model "emits EOS"; None: never
    kv_transfer_params: dict[str, Any] | None = None
    seed: int | None = None  # output token ids are deterministic per seed
    lora_name: str | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (times are simulated seconds)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    arrival: float
    first_scheduled_at: float
    first_token_at: float
    time: float  # when this output is visible (the step's end)
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(slots=True)
class StepResult:
    start: float
    duration: float
    outputs: list[RequestOutput]
    events: list[KVEvent]
    num_new_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_reqs: int = 0

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def idle(self) -> bool:
        return self.num_new_tokens == 0


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_held_blocks: int
    # vllm:cache_config_info: the KV blocks of this engine and their size (what a real scrape reads there)
    num_gpu_blocks: int = 0
    block_size: int = 0


class _Req:
    """Scheduler-side state of one request."""

    __slots__ = (
        "req", "prompt", "output", "status", "num_computed", "block_ids", "hashes", "committed",
        "num_cached", "first_scheduled_at", "first_token_at", "remote_decode", "remote_prefill",
        "ready_at", "remote_done", "rng", "num_prompt", "num_tokens", "lookahead",
    )

    def __init__(self, req: SimRequest, prompt: np.ndarray, hashes: list[int]) -> None:
        self.req = req
        self.prompt = prompt
        self.num_prompt = len(prompt)
        self.num_tokens = self.num_prompt  # prompt + output; kept as a field: the scheduler reads it often
        self.output: list[int] = []
        self.status = WAITING
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.hashes = hashes  # engine hashes of full blocks known so far (prompt, then output)
        self.committed = 0  # blocks whose hash has been committed in the pool
        self.num_cached = -1
        self.first_scheduled_at = -1.0
        self.first_token_at = -1.0
        self.remote_decode = False
        self.remote_prefill = False
        self.remote_done = False
        self.ready_at = 0.0
        self.lookahead = 0  # speculative tokens verified with this step (decode steps only)
        seed = req.seed if req.seed is not None else zlib.crc32(req.request_id.encode())
        self.rng = random.Random(seed)

    def append_output(self, token: int) -> None:
        self.output.append(token)
        self.num_tokens += 1

    def tokens(self, start: int, end: int) -> list[int] | np.ndarray:
        p = self.num_prompt
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p : end - p]
        return self.prompt[start:].tolist() + self.output[: end - p]


def draw_token(rng: random.Random, vocab: int) -> int:
    """``rng.randrange(vocab)``, drawn as CPython draws it (rejection sampling over
    ``getrandbits(vocab.bit_length())``) without randrange's argument handling: the same id, 3x cheaper."""
    k = vocab.bit_length()
    t = rng.getrandbits(k)
    while t >= vocab:
        t = rng.getrandbits(k)
    return t


def draw_tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    """``[rng.randrange(vocab) for _ in range(n)]`` with the same ids: the accepted draws of the rejection
    sampling are the draws below ``vocab`` in order, and each round draws only as many as are still
    missing, so the generator ends where n single draws leave it."""
    k = vocab.bit_length()
    gb = rng.getrandbits
    out: list[int] = []
    while n > 0:
        got = [gb(k) for _ in range(n)]
        kept = [t for t in got if t < vocab]
        out += kept
        n -= len(kept)
    return out


class EngineCore:
    def __init__(
        self,
        cost: CostModel,
        config: EngineConfig | None = None,
        events: Callable[[list[KVEvent], float], None] | None = None,
    ) -> None:
        self.cost = cost
        self.config = cfg = config or EngineConfig()
        if cfg.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {cfg.role!r}")
        self.block_size = cfg.block_size
        self.num_blocks = cfg.num_blocks if cfg.num_blocks is not None else cost.num_blocks(cfg.block_size)
        model_len = cfg.max_model_len if cfg.max_model_len is not None else cost.model.max_model_len
        self.max_model_len = min(model_len, self.num_blocks * cfg.block_size)
        self.engine_id = cfg.engine_id
        self.tp_size = cfg.tp_size if cfg.tp_size is not None else cost.deployment.tp
        self.pool = BlockPool(self.num_blocks, cfg.block_size, new_root_hash(cfg.hash_seed), cfg.kv_events,
                              cfg.kv_events_in_process)
        self.events_cb = events
        self.on_kv_pulled: Callable[[dict[str, Any]], None] | None = None
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._loading: dict[str, _Req] = {}
        self._reqs: dict[str, _Req] = {}
        self._held: dict[tuple[int, ...], float] = {}  # held prefill blocks -> expiry time
        self._now = 0.0
        # Bumped by every call that may change ``stats()`` other than the token counters alone (a quiet decode
        # step that allocates no block changes only generation_tokens): a scrape that finds it unchanged
        # knows the load it reports (running, waiting, KV usage, prefix counters, held blocks) is the same.
        self.load_version = 0
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, req: SimRequest) -> None:
        if req.request_id in self._reqs:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        prompt = np.asarray(req.prompt_token_ids, dtype=np.uint32)
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; this engine's maximum context length is {self.max_model_len}"
            )
        if req.max_tokens <= 0:
            raise ValueError("max_tokens must be at least 1")
        r = _Req(req, prompt, self.pool.hash_tokens(prompt))
        params = req.kv_transfer_params or {}
        role = self.config.role
        r.remote_decode = bool(params.get("do_remote_decode")) and role in ("prefill", "both")
        r.remote_prefill = (
            bool(params.get("do_remote_prefill")) and role in ("decode", "both")
            and params.get("remote_block_ids") is not None
        )
        self._reqs[req.request_id] = r
        self._waiting.append(r)
        self.load_version += 1

    def abort(self, request_id: str) -> bool:
        r = self._reqs.pop(request_id, None)
        if r is None:
            return False
        self.load_version += 1
        if r.status == RUNNING:
            self._running.remove(r)
        elif r.status == LOADING_REMOTE:
            self._loading.pop(request_id, None)
        else:
            try:
                self._waiting.remove(r)
            except ValueError:
                pass
        if r.block_ids:
            self.pool.free(r.block_ids)
            r.block_ids = []
        r.status = FINISHED
        return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def next_event_time(self) -> float | None:
        times = [r.ready_at for r in self._loading.values()]
        times.extend(self._held.values())
        return min(times) if times else None

    def release_remote(self, block_ids: Sequence[int]) -> bool:
        key = tuple(int(b) for b in block_ids)
        if self._held.pop(key, None) is None:
            return False
        self.load_version += 1
        self.pool.free(list(key))
        return True

    def reset_prefix_cache(self) -> list[KVEvent]:
        """Forget cached hashes; returns the AllBlocksCleared batch (also given to the events callback)."""
        self.load_version += 1
        self.pool.clear()
        return self._emit(self._now)

    def stats(self) -> EngineStats:
        c = self.pool.counters
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting) + len(self._loading),
            kv_usage=self.pool.usage,
            prefix_queries=c.queries,
            prefix_hits=c.hits,
            num_preemptions=self.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            num_held_blocks=sum(len(k) for k in self._held),
            num_gpu_blocks=self.num_blocks,
            block_size=self.block_size,
        )

    # ---- quiet decode runs (virtual time) -----------------------------------------------------------
    def plan_quiet(self, now: float, max_steps: int, with_blocks: bool) -> list[float]:
        """Durations of the next steps from ``now`` that are *quiet*, without applying them.

        A quiet step is a step() whose only effect is one decode token for every running request: nothing
        waits or loads, every running request has its first token and needs exactly one more, none
        finishes in it, speculative decoding is off (a step may emit several tokens), no held-block timer
        is due at its start and, unless ``with_blocks``, it neither allocates nor commits a block (so it
        publishes no KV event). With ``with_blocks`` (a pool that
        publishes no events) block growth and commits are allowed while the free queue covers them.
        Nothing outside the engine can see a quiet step except through ``stats()`` and through what the
        next non-quiet step does, so a virtual-time driver may apply them lazily with ``apply_quiet`` and
        get exactly the state, token ids and times that step() one by one would have produced: the same
        cost-model calls with the same arguments, summed in the same order.
        """
        if self.config.speculative is not None:  # a step may emit several tokens: step one by one
            return []
        running = self._running
        b = len(running)
        if not b or self._waiting or self._loading or b > self.config.max_num_batched_tokens or max_steps <= 0:
            return []
        bs = self.block_size
        max_len = self.max_model_len
        k = max_steps
        kv = 0
        grow_at: list[int] = []  # with_blocks: per request, the first step that needs a new block
        for r in running:
            c = r.num_computed
            nout = len(r.output)
            if r.num_tokens - c != 1 or not nout:
                return []
            req = r.req
            k = min(k, req.max_tokens - nout - 1, max_len - r.num_tokens - 1)
            if not req.ignore_eos and req.eos_at is not None:
                k = min(k, max(req.eos_at, req.min_tokens) - nout - 1)
            first_alloc = len(r.block_ids) * bs - c
            if with_blocks:
                grow_at.append(first_alloc)
            else:
                k = min(k, first_alloc, (c // bs + 1) * bs - c - 1)
            kv += c
            if k <= 0:
                return []
        if with_blocks:  # stop before the step that would need more blocks than are free (a preemption)
            free = self.pool.num_free

            def blocks_for(steps: int) -> int:  # a request needs one block at steps g, g + bs, g + 2 bs, ...
                return sum((steps - 1 - g) // bs + 1 for g in grow_at if g < steps)

            while k > 0 and blocks_for(k) > free:
                k -= 1
        timer = self.next_event_time()
        step_time = self.cost.step_time
        out: list[float] = []
        t = now
        for _ in range(k):
            if timer is not None and t >= timer:
                break
            d = step_time(b, float(kv + b), kv)
            out.append(d)
            t = t + d
            kv += b
        return out

    def apply_quiet(self, count: int, start: float) -> None:
        """Apply ``count`` quiet steps planned by ``plan_quiet`` (the last one starting at ``start``).

        Steps in which no request needs a new block or fills one change only each request's computed count
        and output: those are applied per request, many at once (each request draws from its own generator,
        so the ids are the same); a step that allocates or commits runs as ``step`` runs it, blocks first in
        running order, so block ids and cache state are the same too.
        """
        if count <= 0:
            return
        running = self._running
        bs = self.block_size
        vocab = self.config.vocab_size
        pool = self.pool
        done = 0
        while done < count:
            m = count - done
            for r in running:  # steps until some request needs a block (or fills one)
                c = r.num_computed
                m = min(m, len(r.block_ids) * bs - c, (r.committed + 1) * bs - c - 1)
            if m > 0:
                for r in running:
                    r.num_computed += m
                    r.output += draw_tokens(r.rng, vocab, m)
                    r.num_tokens += m
                done += m
                continue
            for r in running:
                if r.num_computed + 1 > len(r.block_ids) * bs:
                    self.load_version += 1
                    new = pool.allocate(1)
                    assert new is not None, "plan_quiet promised a free block"
                    r.block_ids.extend(new)
            for r in running:
                r.num_computed += 1
                if r.num_computed // bs > r.committed:
                    self._commit(r)
                r.append_output(draw_token(r.rng, vocab))
            done += 1
        self.generation_tokens += count * len(running)
        self._now = start

    # ---- the step --------------------------------------------------------------------------------
    def step(self, now: float) -> StepResult:
        sched = self.schedule(now)
        return self.execute(now, sched)

    def schedule(self, now: float) -> list[tuple[_Req, int]]:
        """The first half of ``step``: what runs in the step starting at ``now`` (blocks are allocated).

        A data-parallel group (engine.sim.dpgroup) schedules every rank, asks each for ``step_work``, takes
        the group's step time from the cost model and then ``execute``s every rank with that duration: the
        ranks step together and the slowest decides. ``step`` is ``execute(now, schedule(now))``.
        """
        self._now = now
        self.load_version += 1
        self._expire_held(now)
        self._finish_remote_loads(now)
        budget = self.config.max_num_batched_tokens
        sched: list[tuple[_Req, int]] = []
        preempted = False
        running = self._running
        i = 0
        spec = self.config.speculative
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.num_tokens - r.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            look = 0
            if spec is not None and n == 1 and r.num_computed >= r.num_prompt:
                look = min(spec.num_speculative_tokens, budget - 1)
            r.lookahead = look
            scheduled = True
            while not self._grow(r, n + look):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is r:
                    scheduled = False
                    break
            if not scheduled:
                break
            sched.append((r, n))
            self._commit(r, n)
            budget -= n + look
            i += 1
        if not preempted:
            budget = self._admit(now, budget, sched)
        return sched

    @staticmethod
    def step_work(sched: list[tuple[_Req, int]]) -> tuple[int, float, int]:
        """(new tokens, attention pairs, KV tokens read) of a scheduled step, as the cost model takes them
        (a decode with speculation verifies 1 + lookahead tokens)."""
        new_tokens = 0
        pairs = 0.0
        kv_read = 0
        for r, n in sched:
            c = r.num_computed
            q = n + r.lookahead
            new_tokens += q
            pairs += prefill_pairs(q, c)
            kv_read += c
        return new_tokens, pairs, kv_read

    def step_cost(self, sched: list[tuple[_Req, int]]) -> float:
        """Seconds this engine's scheduled step takes: the roofline of its tokens plus the draft forwards."""
        new_tokens, pairs, kv_read = self.step_work(sched)
        if not new_tokens:
            return 0.0
        t = self.cost.step_time(new_tokens, pairs, kv_read)
        spec = self.config.speculative
        if spec is not None:
            drafting = [r.num_computed for r, _ in sched if r.lookahead]
            if drafting:
                t += draft_seconds(self.cost, spec, len(drafting), float(sum(drafting)))
        return t

    def _admit(self, now: float, budget: int, sched: list[tuple[_Req, int]]) -> int:
        pool, bs, waiting = self.pool, self.block_size, self._waiting
        while waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            r = waiting[0]
            if r.remote_prefill and not r.remote_done:
                if not self._start_remote_load(r, now):
                    break
                continue
            if r.num_computed == 0:
                hits = pool.find_cached(r.hashes, (r.num_tokens - 1) // bs)
                computed = len(hits) * bs
            else:  # a remote load left its blocks in place
                hits = []
                computed = r.num_computed
            n = min(r.num_tokens - computed, budget)
            need = -(-(computed + n) // bs) - len(r.block_ids) - len(hits)
            if not pool.can_allocate(need, hits):
                break
            if hits:
                pool.touch(hits)
            new = pool.allocate(need) if need > 0 else []
            assert new is not None
            r.block_ids.extend(hits)
            r.block_ids.extend(new)
            if r.num_computed == 0:
                pool.record_query(r.num_tokens, computed)
                r.num_computed = computed
                r.committed = len(hits)
            if r.num_cached < 0:
                r.num_cached = r.num_computed
            if r.first_scheduled_at < 0:
                r.first_scheduled_at = now
            waiting.popleft()
            r.status = RUNNING
            self._running.append(r)
            sched.append((r, n))
            self._commit(r, n)
            budget -= n
        return budget

    def _start_remote_load(self, r: _Req, now: float) -> bool:
        """do_remote_prefill: take the local prefix hit, allocate the rest and start the KV pull."""
        pool, bs = self.pool, self.block_size
        hits = pool.find_cached(r.hashes, (r.num_prompt - 1) // bs)
        need = -(-r.num_prompt // bs) - len(hits)
        if not pool.can_allocate(need, hits):
            return False
        pool.touch(hits)
        new = pool.allocate(need) or []
        r.block_ids = hits + new
        r.committed = len(hits)
        local = len(hits) * bs
        pool.record_query(r.num_prompt, local)
        r.ready_at = now + self.cost.transfer_time(r.num_prompt - local, self.config.link)
        if r.first_scheduled_at < 0:
            r.first_scheduled_at = now
        r.status = LOADING_REMOTE
        self._waiting.popleft()
        self._loading[r.req.request_id] = r
        return True

    def _finish_remote_loads(self, now: float) -> None:
        if not self._loading:
            return
        done = [r for r in self._loading.values() if r.ready_at <= now]
        for r in done:
            del self._loading[r.req.request_id]
            r.remote_done = True
            r.num_computed = r.num_prompt - 1  # vLLM recomputes the last prompt token
            self._commit(r)
            r.status = WAITING
            self._waiting.appendleft(r)
            if self.on_kv_pulled is not None and r.req.kv_transfer_params:
                self.on_kv_pulled(r.req.kv_transfer_params)

    def _expire_held(self, now: float) -> None:
        if not self._held:
            return
        for key in [k for k, t in self._held.items() if t <= now]:
            del self._held[key]
            self.pool.free(list(key))

    def _grow(self, r: _Req, n: int) -> bool:
        need = -(-(r.num_computed + n) // self.block_size) - len(r.block_ids)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        r.block_ids.extend(new)
        return True

    def _preempt(self, r: _Req) -> None:
        self.pool.free(r.block_ids)
        r.block_ids = []
        r.num_computed = 0
        r.committed = 0
        r.status = WAITING
        self._waiting.appendleft(r)
        self.num_preemptions += 1

    def _commit(self, r: _Req, scheduled: int = 0) -> None:
        """Hash and commit every block of ``r`` whose tokens are all computed, or scheduled to be (``scheduled``
        more tokens in the step being built). As vLLM's ``allocate_slots`` caches the blocks a step will fill
        when it schedules them, a request scheduled after ``r`` in the same step already hits them: two
        requests that wait with the same prompt prefix share it even when one step starts both."""
        bs = self.block_size
        full = min(r.num_computed + scheduled, r.num_tokens) // bs
        if full <= r.committed:
            return
        hashes = r.hashes
        while len(hashes) < full:  # output blocks get their hash once their tokens exist
            i = len(hashes)
            hashes.append(self.pool.next_hash(hashes[i - 1] if i else None, r.tokens(i * bs, (i + 1) * bs)))
        start = r.committed
        parent = hashes[start - 1] if start else None
        self.pool.commit(
            r.block_ids[start:full], hashes[start:full], parent, r.tokens(start * bs, full * bs),
            lora_name=r.req.lora_name,
        )
        r.committed = full

    def execute(self, now: float, sched: list[tuple[_Req, int]], duration: float | None = None) -> StepResult:
        """The second half of ``step``: apply the scheduled step; it lasts ``duration`` (None: this engine's
        own step time from the cost model)."""
        self.load_version += 1
        new_tokens = 0
        prefill_tokens = 0
        decodes = 0
        for r, n in sched:
            new_tokens += n + r.lookahead
            if r.num_computed >= r.num_prompt:
                decodes += 1
            else:
                prefill_tokens += n
        if duration is None:
            duration = self.step_cost(sched)
        elif not new_tokens:
            duration = 0.0
        spec = self.config.speculative
        end = now + duration
        outputs: list[RequestOutput] = []
        vocab = self.config.vocab_size
        max_len = self.max_model_len
        finished: list[_Req] = []
        for r, n in sched:
            # speculation: the drafts accepted in a row (each with probability `acceptance`) were verified
            # with this step; their tokens count as computed and are emitted with the step's own token
            accepted = 0
            if r.lookahead:
                while accepted < r.lookahead and r.rng.random() < spec.acceptance:  # type: ignore[union-attr]
                    accepted += 1
                r.lookahead = 0
            r.num_computed += n
            self._commit(r)
            if r.num_computed < r.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            req = r.req
            new_ids: list[int] = []
            reason = None
            for j in range(1 + accepted):
                if j:
                    r.num_computed += 1  # the accepted draft's KV was computed by the verify pass
                tok = draw_token(r.rng, vocab)
                r.append_output(tok)
                new_ids.append(tok)
                self.generation_tokens += 1
                nout = len(r.output)
                if nout >= req.max_tokens:
                    reason = "length"
                elif (
                    not req.ignore_eos and req.eos_at is not None and nout >= max(req.eos_at, req.min_tokens)
                ):
                    reason = "stop"
                elif r.num_tokens >= max_len:
                    reason = "length"
                if reason is not None:
                    break
            if accepted:
                self._commit(r)
            if r.first_token_at < 0:
                r.first_token_at = end
                self.prompt_tokens += r.num_prompt
            nout = len(r.output)
            params = None
            if reason is not None:
                finished.append(r)
                params = self._finish(r, end)
            outputs.append(
                RequestOutput(
                    req.request_id, new_ids, reason is not None, reason, r.num_prompt,
                    max(r.num_cached, 0), nout, req.arrival, r.first_scheduled_at, r.first_token_at, end,
                    params,
                )
            )
        if finished:
            gone = set(map(id, finished))
            self._running = [r for r in self._running if id(r) not in gone]
        events = self._emit(now)
        return StepResult(now, duration, outputs, events, new_tokens, prefill_tokens, decodes)

    def _finish(self, r: _Req, end: float) -> dict[str, Any] | None:
        r.status = FINISHED
        self._reqs.pop(r.req.request_id, None)
        if r.remote_decode:
            key = tuple(r.block_ids)
            self._held[key] = end + self.config.kv_transfer_timeout_s
            r.block_ids = []
            cfg = self.config
            return {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(key),
                "remote_engine_id": self.engine_id,
                "remote_host": cfg.remote_host,
                "remote_port": cfg.remote_port,
                "tp_size": self.tp_size,
            }
        self.pool.free(r.block_ids)
        r.block_ids = []
        return None

    def _emit(self, ts: float) -> list[KVEvent]:
        events = self.pool.drain_events()
        if events and self.events_cb is not None:
            self.events_cb(events, ts)
        return events


__all__ = [
    "EngineConfig", "EngineCore", "EngineStats", "RequestOutput", "ROLES", "SimRequest", "StepResult",
]
