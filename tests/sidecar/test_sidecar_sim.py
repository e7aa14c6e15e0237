"""The sidecar between simulated vLLM pods (engine.sim): a real NIXL-protocol prefill/decode split."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson

from engine.sidecar import Sidecar, SidecarConfig
from engine.sim.fleet import SimFleet
from engine.sim.spec import PodSpec

BLOCK = 16
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12  # ~540 bytes: 135 builtin tokens, 8 full blocks


@contextlib.asynccontextmanager
async def prefill_decode_pods() -> AsyncIterator[tuple]:
    specs = [PodSpec(name="p0", role="prefill", block_size=BLOCK, num_blocks=512, kv_events_port=None, seed=1),
             PodSpec(name="d0", role="decode", block_size=BLOCK, num_blocks=512, kv_events_port=None, seed=1)]
    async with SimFleet(specs, time_scale=0.05) as fleet:
        yield fleet.pods[0], fleet.pods[1]


async def completion(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stream: bool):
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url + "/v1/completions", data=orjson.dumps(body), headers=headers) as r:
        raw = await r.read()
        assert r.status == 200, raw
        if not stream:
            return r.headers, orjson.loads(raw)
        events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
        return r.headers, events[-1]


async def test_decode_pod_holds_the_prompt_after_the_transfer():
    async with prefill_decode_pods() as (prefill_pod, decode_pod):
        prefill, decode = prefill_pod.address, decode_pod.address
        pulled: list[dict] = []  # kv_transfer_params the decode engine pulled KV with
        original = decode_pod.core.on_kv_pulled
        decode_pod.core.on_kv_pulled = lambda params: (pulled.append(params), original(params))
        async with Sidecar(SidecarConfig(decode_url=f"http://{decode}", prefill_pods=(prefill,))) as sc:
            async with aiohttp.ClientSession() as s:
                headers, answer = await completion(s, sc.url, {"x-prefiller-host-port": prefill}, stream=True)
                assert headers["x-kvswitch-prefill-endpoint"] == prefill
                assert answer["usage"]["completion_tokens"] == 5
                # First time: nothing was cached on the prefill pod.
                assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                assert headers["x-kvswitch-prefill-cached-tokens"] == "0"
                prompt_tokens = answer["usage"]["prompt_tokens"]
                full_blocks = prompt_tokens // BLOCK * BLOCK
                # The decode engine pulled the KV from the prefill pod named in the params it got.
                assert len(pulled) == 1 and pulled[0]["do_remote_prefill"] is True
                assert f"{pulled[0]['remote_host']}:{pulled[0]['remote_port']}" == prefill
                assert len(pulled[0]["remote_block_ids"]) == -(-prompt_tokens // BLOCK)

                # The decode pod now holds the transferred blocks: the same prompt sent to it directly hits.
                _, direct = await completion(s, f"http://{decode}", {}, stream=False)
                assert direct["usage"]["prompt_tokens_details"]["cached_tokens"] >= full_blocks - BLOCK

                # Second split request: the prefill pod's own cache hit is what usage reports.
                headers, answer = await completion(s, sc.url, {"x-prefiller-host-port": prefill}, stream=False)
                assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= full_blocks - BLOCK
                assert int(headers["x-kvswitch-prefill-cached-tokens"]) >= full_blocks - BLOCK
