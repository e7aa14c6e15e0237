"""Data-parallel pods behind real Envoy (``kvswitch up --pods 2 --dp 4``): the picker routes to (pod, rank).

Requests sharing a prefix land on the same (pod, rank) (the rank's own KV cache holds it: the pod reports the
hit), the chosen rank reaches the pod in ``X-data-parallel-rank`` (the pod's per-rank counts match the debug
headers), a client-sent rank header is replaced, and the rank-oblivious profile sends no rank at all.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import aiohttp
import pytest

from extproc.localstack import LocalStack, StackOptions

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

GROUPS = [f"shared document number {g}: " + f"chapter {g} of a long manual. " * 120 for g in range(4)]


async def _post(s: aiohttp.ClientSession, url: str, model: str, prompt: str,
                headers: dict[str, str] | None = None) -> tuple[str, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": 2}
    async with s.post(url + "/completions", json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-kvswitch-endpoint"], await r.json()


async def _rank_counts(s: aiohttp.ClientSession, stack: LocalStack) -> dict[str, int]:
    out = {}
    for p in stack.pods:
        async with s.get(f"http://{p.engine_address}/sim/state") as r:
            for rank, st in enumerate((await r.json())["ranks"]):
                out[f"{p.address}#{rank}"] = st["requests"]
    return out


async def test_shared_prefix_lands_on_one_pod_rank_through_envoy():
    opts = StackOptions(pods=2, dp=4, port=0, time_scale=0.05, model_profile="moe", accelerator="H200", seed=7)
    async with LocalStack(opts) as stack, aiohttp.ClientSession() as s:
        model = stack.options.model_name
        routed: dict[int, list[str]] = defaultdict(list)
        cached: dict[int, list[int]] = defaultdict(list)
        for rnd in range(3):
            for g, doc in enumerate(GROUPS):
                # a client's rank header must not steer: the picker's own rank replaces it
                hdrs = {"X-data-parallel-rank": "3"} if rnd == 1 else None
                ep, body = await _post(s, stack.url, model, doc + f" question {rnd}", hdrs)
                routed[g].append(ep)
                cached[g].append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        for g, eps in routed.items():
            assert len(set(eps)) == 1, (g, eps)  # the same (pod, rank) every time
            assert "#" in eps[0]
            assert cached[g][0] == 0 and min(cached[g][1:]) > 0, cached[g]  # that rank's cache has the prefix
        # the pods' own per-rank counts are exactly the ranks the picker named: the header reached the pod
        expected = Counter(e for eps in routed.values() for e in eps)
        counts = await _rank_counts(s, stack)
        assert len(counts) == 8 and all(n == expected.get(k, 0) for k, n in counts.items()), (counts, expected)


async def test_rank_oblivious_profile_sends_no_rank():
    opts = StackOptions(pods=1, dp=4, port=0, time_scale=0.05, model_profile="moe", accelerator="H200",
                        profile="rank-oblivious")
    async with LocalStack(opts) as stack, aiohttp.ClientSession() as s:
        pod = stack.pods[0].address
        for i in range(8):
            ep, _ = await _post(s, stack.url, stack.options.model_name, GROUPS[0] + f" q{i}")
            assert ep == pod  # one endpoint per pod, no rank
        counts = await _rank_counts(s, stack)
        # the pod balanced them itself (vLLM's rule spreads sequential requests over every rank)
        assert sum(counts.values()) == 8 and all(v > 0 for v in counts.values()), counts
