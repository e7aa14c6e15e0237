"""The shared-storage (ExampleConnector) split between two real vLLM CPU servers, through the sidecar."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from engine.sidecar import Sidecar, SidecarConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


async def test_shared_storage_split_on_real_vllm(vllm_pair):  # the session pair (root conftest.py)
    pair = vllm_pair
    pair.clear_shared_storage()
    prompt = "kvswitch shared storage split " * 60  # several 128-token blocks
    body = {"model": pair.model_name, "prompt": prompt, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    config = SidecarConfig(decode_url=pair.b.base_url, connector="shared-storage", prefill_pods=(pair.a.address,))
    async with Sidecar(config) as sc, aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/v1/completions", data=orjson.dumps(body),
                          headers={"x-prefiller-host-port": pair.a.address}) as r:
            raw = await r.read()
            assert r.status == 200, raw
            assert r.headers["x-kvswitch-prefill-endpoint"] == pair.a.address
    events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # nothing was cached on the prefill pod
    # The decode server loaded the prompt's KV from the shared folder instead of computing it.
    assert any(pair.shared_storage_path.iterdir()), "the prefill leg saved no KV"
    decode_hit = usage["prompt_tokens_details"]["decode_cached_tokens"]
    assert decode_hit is not None and decode_hit >= pair.block_size, (decode_hit, pair.b.log_tail())
