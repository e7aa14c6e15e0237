"""The sim's Renderer API (vLLM's /v1/completions/render, /v1/chat/completions/render): token ids, no work."""

from __future__ import annotations

import aiohttp

from engine.sim.spec import PodSpec


async def test_render_returns_the_ids_the_pod_would_schedule_and_runs_nothing(fleet_factory):
    fleet = await fleet_factory([PodSpec(name="p0", seed=1)], time_scale=0.05)
    pod = fleet.pods[0]
    base = f"http://{pod.address}"
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/completions/render",
                          json={"model": "sim-model", "prompt": [5, 6, 7], "max_tokens": 4}) as r:
            assert r.status == 200
            items = await r.json()
        assert isinstance(items, list) and len(items) == 1
        assert items[0]["token_ids"] == [5, 6, 7] and items[0]["model"] == "sim-model"
        assert items[0]["sampling_params"]["max_tokens"] == 4
        text = "hello render"
        async with s.post(base + "/v1/completions/render", json={"model": "sim-model", "prompt": text}) as r:
            assert (await r.json())[0]["token_ids"] == pod.tokenizer.encode(text)
        msgs = [{"role": "user", "content": "hi"}]
        async with s.post(base + "/v1/chat/completions/render", json={"model": "sim-model", "messages": msgs}) as r:
            assert r.status == 200
            chat = await r.json()
        assert isinstance(chat, dict) and chat["token_ids"] == list(pod.tokenizer.encode_chat(msgs))
        async with s.post(base + "/v1/completions/render", json={"model": "other", "prompt": "x"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["param"] == "model"
        async with s.get(base + "/metrics") as r:
            text = await r.text()
    queries = [ln for ln in text.splitlines() if ln.startswith("vllm:prefix_cache_queries_total")]
    assert queries and all(float(ln.split()[-1]) == 0 for ln in queries)  # rendering scheduled nothing
