"""Prefix-hit oracles: the yardsticks a routing policy's prefix hit rate is judged against.

Two of them, because neither alone is fair:

- ``prefix_hit_bound(prompts, block_size)``: one infinite shared cache. Every distinct full prompt block
  is computed once, by the first request that has it; every later request hits its longest prefix of
  blocks already seen (at most ``n - 1`` tokens, as vLLM recomputes the last one). No router beats it
  without evictions, but no real fleet reaches it either: a prefix that two pods need is computed twice.
- ``OracleRouter``: a router for the virtual-time simulator that reads every pod's real block pool (and
  the prompts it has routed there but whose prefill has not run yet) and sends a request to the pod with
  the longest cached prefix, the least loaded one on a tie. It is what a picker with perfect, instant
  knowledge of every cache would do, so it is the bar the issue's "90 % of an oracle" means.

    router = OracleRouter(); sim = ClusterSim(fleet, router); router.attach(sim.pods); sim.run(...)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from engine.kvcache.hashing import hash_blocks
from engine.sim.cluster.routers import BaseRouter, ClusterRequest, Route, Usage

_ORACLE_ROOT = 0x6F7261636C65  # any fixed root: the bound only compares hashes with each other


def prefix_hit_bound(prompts: Iterable[Sequence[int] | np.ndarray], block_size: int = 16) -> float:
    """Hit rate (cached prompt tokens / prompt tokens) of one infinite cache shared by every request."""
    seen: set[int] = set()
    hits = total = 0
    for prompt in prompts:
        n = len(prompt)
        hashes = hash_blocks(prompt, block_size, _ORACLE_ROOT)
        usable = (n - 1) // block_size  # vLLM recomputes the last token, so a full hit stops one block short
        k = 0
        while k < usable and hashes[k] in seen:
            k += 1
        hits += k * block_size
        total += n
        seen.update(hashes)
    return hits / total if total else 0.0


class OracleRouter(BaseRouter):
    """Longest cached prefix on any pod (pool + prefills routed but not run yet); least loaded on a tie."""

    name = "oracle"

    def __init__(self) -> None:
        self._pods: list = []  # simulator Pods (decode-capable), set by attach()
        self._pending: dict[str, Counter[int]] = {}  # pod -> hashes of routed requests not yet prefilled
        self._routed: dict[str, tuple[str, list[int]]] = {}  # request id -> (pod, its hashes there)

    def attach(self, pods: list) -> None:
        """Give the router the simulator's pods (``ClusterSim.pods``); call once before ``run``."""
        self._pods = [p for p in pods if p.spec.role != "prefill"]
        self._pending = {p.name: Counter() for p in self._pods}

    def route(self, req: ClusterRequest, now: float) -> Route:
        if not self._pods:
            raise RuntimeError("OracleRouter.attach(sim.pods) was not called")
        best: tuple[int, int] | None = None
        choice = None
        for pod in self._pods:
            pool = pod.core.pool
            hashes = pool.hash_tokens(req.prompt)  # each pod has its own root hash, as in vLLM
            pending = self._pending[pod.name]
            k = 0
            while k < len(hashes) and (pool.cached_block(hashes[k]) is not None or pending[hashes[k]] > 0):
                k += 1
            st = pod.core.stats()
            load = st.num_running + st.num_waiting
            key = (-k, load)
            if best is None or key < best:
                best, choice = key, (pod, hashes)
        pod, hashes = choice  # type: ignore[misc]
        self._pending[pod.name].update(hashes)
        self._routed[req.request_id] = (pod.name, hashes)
        return pod.name, None

    def _done_prefill(self, req: ClusterRequest) -> None:
        routed = self._routed.pop(req.request_id, None)
        if routed is not None:
            pending = self._pending[routed[0]]
            pending.subtract(routed[1])
            for h in routed[1]:
                if pending[h] <= 0:
                    del pending[h]

    def on_first_token(self, req: ClusterRequest, at: float) -> None:
        self._done_prefill(req)  # the prompt's blocks are committed in the pool by now

    def on_finished(self, req: ClusterRequest, usage: Usage, at: float) -> None:
        self._done_prefill(req)

    def on_failed(self, req: ClusterRequest, reason: str, at: float) -> None:
        self._done_prefill(req)


__all__ = ["OracleRouter", "prefix_hit_bound"]
