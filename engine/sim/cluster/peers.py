"""Emulations of the peers' published routing policies, for the virtual-time load curves.

The real peers (sglang-router, vllm-router, Envoy) run in real time through ``kvswitch bench compare``;
these emulations replay the same decision rules inside ``ClusterSim`` so a whole load curve of every
workload takes seconds per point. Each is written from the peer's source/documentation (see
/work/shared/reference/peers.md) and says below where it approximates.

- ``sglang:cache_aware`` (sglang-router 0.3.2 with its CLI defaults, as installed and measured): per-worker
  approximate radix tree of the prompts it routed (learned from its own decisions, never from the engines).
  Load = requests it routed that have not finished (streamed or not). If ``max - min > 64`` and
  ``max > 1.5 x min``: the least loaded worker. Else the prefix match in the tree: if matched / prompt > 0.3,
  the worker holding that match (most recently used one when several do), even while it is the busiest; else
  the least loaded worker, ties always to the same worker. The chosen worker's tree learns the prompt at
  routing. tests/bench/test_peer_placement.py holds the installed binary to each of these rules.
  (sgl-router's earlier releases sent a low match to the worker with the smallest tree, as
  /work/shared/reference/peers.md still says; 0.3.2 does not: a fresh prompt goes to the same idle worker
  as the 8,000 characters before it. That older rule is kept as the baseline ``tree:smallest``.)
- ``vllm:cache_aware`` (vllm-router 0.1.17, a fork of the same code): the same tree and rules with the same
  CLI defaults (``vllm-router --help``: match ratio 0.3, abs 64, rel 1.5; the library's own defaults,
  0.5 / 32 / 1.0001, apply only when it is embedded), so the same emulation as ``sglang:cache_aware``
  (vllm-project/router src/policies/cache_aware.rs; the wheel's Rust source is not shipped). Its tree holds
  token ids, which it asks a worker for (vLLM's Renderer API, ``/v1/completions/render``; without
  it every prompt is a low match). tests/bench/test_peer_placement.py holds the installed binary to the same
  rules as sglang-router's. In real time the two have placed alike (shared-prefix 2x and 3x at time scale 4:
  11.67 / 11.68 and 11.62 / 11.62 req/s, hit rate 83 % each).
- ``tree:smallest`` (a baseline, not a peer as installed): the same tree and balance rule, a low match to the
  worker whose tree holds the fewest blocks, i.e. the least prompt work sent so far (sgl-router's earlier
  ``get_smallest_tenant``). It balances cumulative prompt work blindly, which is strong on prompts of very
  different lengths; the virtual-time curves keep it beside the peers so the bar is not lowered.
- ``vllm:kv_aware`` (vllm-router 0.1.17 as installed; its Rust source is not shipped and the repository's
  kv_aware.rs we can read is an older design, so this is read from the wheel's binary: symbols, log strings and
  the disassembly of ``MultiplicativeScorer::score``, ``request_prefill_tokens``, ``TemperaturePicker::pick``,
  ``InMemorySlotManager`` and ``RequestLoadGuard::release``). Per worker it keeps two counters: prompt tokens
  of its requests still in prefill and requests in flight. A request's new prefill tokens on a worker are its
  prompt tokens less the worker's longest cached prefix of full blocks (from the engines' KV events), at most
  ``(n - 1) // block_size`` blocks. Cost = (new prefill tokens + active prefill tokens) x (requests in flight
  + 1); with ``--router-temperature 0`` (the default) the lowest cost wins, the first of equal costs. The
  chosen worker's counters take the request's new prefill tokens and one request; the first frame of its
  response moves it to decode (the prefill tokens come off); finishing takes the request off. There are no
  speculative index entries and no separate fallback: a miss everywhere is just the least-cost worker.
  A cached prefix lowers a worker's prefill term but every request in flight multiplies it, so on a shared
  system prompt it spreads, unlike the longest-match rule of the repository's older kv_aware.rs.
  tests/bench/test_peer_placement.py holds the installed binary to this rule (stand-in workers publishing
  KV events; the router takes them only on vLLM's default topic, the empty string, as the bench fleet uses).
- ``envoy:round_robin``: Envoy's ROUND_ROBIN over the pods (``RoundRobinRouter``).
- ``least-loaded``: fewest requests in flight (``least-inflight``: pickers.simple.LeastInFlight).

Approximations (all stated in the curve reports):

- The trees hold prompt tokens in 16-token blocks (chained hashes), not characters: a match is counted in
  whole blocks, so the match ratio is the character ratio rounded down to a block (prompts are thousands of
  tokens; the 0.3 / 0.5 thresholds are unaffected at that scale). Tree eviction (every 120 s down to 2^26
  characters per worker) never triggers on the curve workloads; a per-worker cap of blocks bounds memory.
- kv_aware reads each pod's committed blocks directly (what its event-fed index holds when events arrive at
  once, as they do in virtual time) instead of decoding the event stream; only the device tier exists in the
  sim (the host/external/disk credits 0.8/0.6/0.3 never apply). Its workers are in the fleet's order, so the
  first of equal costs (which decides only ties, e.g. the very first request) may differ from the real router's
  order (it listed the workers reversed in session 5's logs). "First frame" is the first token here.
- Load is the router's own in-flight count, decremented when the request finishes, as both routers do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.kvcache.hashing import hash_blocks
from engine.sim.cluster.routers import PEERS, BaseRouter, ClusterRequest, Endpoint, Role, Route, Usage

TREE_BLOCK = 16  # tokens per tree node (see "Approximations")
_TREE_ROOT = 0x7472656572  # any fixed root: the tree only compares its own hashes


@dataclass(frozen=True, slots=True)
class CacheAwareParams:
    """The cache_aware policy's knobs (names as in the peers' CLIs)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # a low match: the least loaded worker (the peers as installed), or the smallest tree (tree:smallest)
    low_match: Literal["least-loaded", "smallest-tree"] = "least-loaded"
    max_tree_blocks: int = 1 << 22  # per worker (2^26 characters at ~1 char/4 tokens... bounds memory)


SGLANG_CACHE_AWARE = CacheAwareParams()
VLLM_CACHE_AWARE = CacheAwareParams()
SMALLEST_TREE = CacheAwareParams(low_match="smallest-tree")


def _decoders(endpoints: Sequence[Endpoint]) -> list[str]:
    out = [e.address for e in endpoints if e.role.can_decode() and e.role is not Role.BOTH]
    return out or [e.address for e in endpoints if e.role.can_decode()]


class _LoadTracking(BaseRouter):
    """In-flight requests per worker as the router counts them: +1 when routed, -1 when finished/failed."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.workers = _decoders(endpoints)
        if not self.workers:
            raise ValueError(f"{self.name} needs at least one decode-capable pod")
        self.index = {w: i for i, w in enumerate(self.workers)}
        self.load = np.zeros(len(self.workers), dtype=np.int64)

    def _routed(self, req: ClusterRequest, i: int) -> Route:
        self.load[i] += 1
        req.state["peer_worker"] = i
        return self.workers[i], None

    def _release(self, req: ClusterRequest) -> None:
        i = req.state.pop("peer_worker", None)
        if i is not None and self.load[i] > 0:
            self.load[i] -= 1

    def least_loaded(self) -> int:
        return int(np.argmin(self.load))  # first on a tie, as Rust's min_by_key

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        self._release(req)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        self._release(req)


class PrefixTree:
    """A multi-tenant prefix tree of block hashes: which workers were sent which prompt prefixes.

    Node = one block's chained hash (it names its whole prefix, like a radix-tree path); per node the
    tenants that hold it with their last access time. Per tenant an LRU of its nodes bounds memory.
    """

    def __init__(self, tenants: int, max_blocks: int) -> None:
        self.nodes: dict[int, dict[int, float]] = {}
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(tenants)]
        self.max_blocks = max_blocks
        self._clock = 0.0

    def size(self, tenant: int) -> int:
        return len(self.lru[tenant])

    def match(self, hashes: Sequence[int]) -> tuple[int, int | None]:
        """(blocks matched, the tenant holding them: most recently used) for the longest stored prefix."""
        nodes = self.nodes
        k = 0
        while k < len(hashes) and hashes[k] in nodes:
            k += 1
        if k == 0:
            return 0, None
        tenants = nodes[hashes[k - 1]]
        return k, max(tenants, key=tenants.__getitem__)

    def insert(self, hashes: Sequence[int], tenant: int) -> None:
        self._clock += 1.0
        t = self._clock
        lru = self.lru[tenant]
        for h in hashes:
            node = self.nodes.get(h)
            if node is None:
                node = self.nodes[h] = {}
            node[tenant] = t
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.max_blocks:
            h, _ = lru.popitem(last=False)
            node = self.nodes.get(h)
            if node is not None:
                node.pop(tenant, None)
                if not node:
                    del self.nodes[h]


class CacheAwareRouter(_LoadTracking):
    """sglang-router / vllm-router ``cache_aware`` (see the module docstring)."""

    def __init__(self, endpoints: Sequence[Endpoint], params: CacheAwareParams, name: str) -> None:
        self.name = name
        super().__init__(endpoints)
        self.params = params
        self.tree = PrefixTree(len(self.workers), params.max_tree_blocks)
        self.decisions = {"load_balance": 0, "cache_affinity": 0, "low_match": 0}

    def route(self, req: ClusterRequest, now: float) -> Route:
        p = self.params
        hashes = hash_blocks(req.prompt, TREE_BLOCK, _TREE_ROOT)
        lo, hi = int(self.load.min()), int(self.load.max())
        if hi - lo > p.balance_abs_threshold and hi > lo * p.balance_rel_threshold:
            i = self.least_loaded()
            self.decisions["load_balance"] += 1
        else:
            k, tenant = self.tree.match(hashes)
            ratio = k * TREE_BLOCK / max(1, len(req.prompt))
            if ratio > p.cache_threshold and tenant is not None:
                i = tenant
                self.decisions["cache_affinity"] += 1
            else:
                self.decisions["low_match"] += 1
                if p.low_match == "smallest-tree":
                    sizes = [self.tree.size(t) for t in range(len(self.workers))]
                    i = int(np.argmin(sizes))
                else:
                    i = self.least_loaded()
        self.tree.insert(hashes, i)
        return self._routed(req, i)


class KvAwareRouter(_LoadTracking):
    """vllm-router 0.1.17 ``kv_aware``: least cost = (new prefill tokens + active prefill tokens) x (requests + 1).

    Per worker the router keeps two counters (its ``SlotCounters``): prompt tokens of its requests still in
    prefill and requests in flight. Routing adds the request's new prefill tokens and one request to the
    chosen worker; its first token moves it to decode (the prefill tokens come off); finishing or failing
    takes it off (the router's ``RequestLoadGuard::release``: to decode if still in prefill, then ``free``).
    Invariants: both counters are >= 0; ``load`` is the router's in-flight count (``_LoadTracking``).
    """

    name = "vllm:kv_aware"

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        super().__init__(endpoints)
        self._pods: list = []
        self.prefill_tokens = np.zeros(len(self.workers), dtype=np.int64)  # active prefill tokens per worker

    def attach(self, pods: list) -> None:
        """The simulator's pods (``ClusterSim`` calls this once it has built them)."""
        by_name = {p.name: p for p in pods}
        self._pods = [by_name[w] for w in self.workers]

    def new_prefill_tokens(self, i: int, prompt: np.ndarray) -> int:
        """Prompt tokens worker ``i`` must compute: all but its longest contiguous cached prefix of full blocks,
        at most ``(n - 1) // block_size`` blocks (the last token is always computed, as vLLM does)."""
        pool = self._pods[i].core.pool
        hashes = pool.hash_tokens(prompt)
        n = len(prompt)
        cap = min(len(hashes), max(0, n - 1) // pool.block_size)
        k = 0
        while k < cap and pool.cached_block(hashes[k]) is not None:
            k += 1
        return n - k * pool.block_size

    def route(self, req: ClusterRequest, now: float) -> Route:
        if not self._pods:
            raise RuntimeError("KvAwareRouter needs ClusterSim to attach its pods")
        new = np.array([self.new_prefill_tokens(i, req.prompt) for i in range(len(self.workers))], dtype=np.int64)
        cost = (new + self.prefill_tokens).astype(np.float64) * (self.load + 1).astype(np.float64)
        i = int(np.argmin(cost))  # temperature 0: the lowest cost, the first of equal minima
        self.prefill_tokens[i] += new[i]
        req.state["kv_prefill"] = (i, int(new[i]))
        return self._routed(req, i)

    def _to_decode(self, req: ClusterRequest) -> None:
        held = req.state.pop("kv_prefill", None)
        if held is not None:
            i, tokens = held
            self.prefill_tokens[i] = max(0, int(self.prefill_tokens[i]) - tokens)

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        self._to_decode(req)

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        self._to_decode(req)
        self._release(req)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        self._to_decode(req)
        self._release(req)


def make_peer(name: str, endpoints: Sequence[Endpoint]) -> BaseRouter:
    """A peer emulation by name (``PEERS``); ValueError on an unknown one."""
    if name == "sglang:cache_aware":
        return CacheAwareRouter(endpoints, SGLANG_CACHE_AWARE, name)
    if name == "vllm:cache_aware":
        return CacheAwareRouter(endpoints, VLLM_CACHE_AWARE, name)
    if name == "vllm:kv_aware":
        return KvAwareRouter(endpoints)
    if name == "tree:smallest":
        return CacheAwareRouter(endpoints, SMALLEST_TREE, name)
    raise ValueError(f"unknown peer emulation {name!r}; known: {', '.join(PEERS)}")


__all__ = ["PEERS", "SGLANG_CACHE_AWARE", "SMALLEST_TREE", "VLLM_CACHE_AWARE", "CacheAwareParams", "CacheAwareRouter",
           "KvAwareRouter", "PrefixTree", "make_peer"]
