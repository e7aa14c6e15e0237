"""The pd overlay's wiring, end to end: the decode pod's sidecar keeps no allow list, only the secret it shares
with the picker (`--picker-secret-file`, `server.prefill_signing_secret_file`); a prefill leg the picker chose
and signed runs through real Envoy, and without the picker's signature the sidecar refuses it (403) before
contacting anything."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest

from e2e.conftest import SIM_MODEL
from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import picker_config, running_picker
from engine.sidecar import SidecarConfig
from engine.sidecar.server import Sidecar
from extproc.config import EndpointConfig
from extproc.envoyconfig.builder import EnvoyConfigOptions

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
LONG = "a long shared document " * 600  # far above the decider's 2048-token threshold: a prefill leg


@pytest.mark.parametrize("signing", [True, False])
async def test_sidecar_runs_only_picker_signed_prefill_legs(tmp_path, signing):
    from engine.sim.fleet import PodSpec, SimFleet

    secret = tmp_path / "prefill-signing-key"
    secret.write_text("6f1d0c9a7b3e4f2a8c5d1e0b9a7f6e3d\n")
    specs = [PodSpec(name="prefill-0", role="prefill", kv_events_port=None, model_name=SIM_MODEL),
             PodSpec(name="decode-0", role="decode", kv_events_port=None, model_name=SIM_MODEL)]
    async with contextlib.AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(SimFleet(specs, time_scale=0.05))
        prefill, decode = fleet["prefill-0"], fleet["decode-0"]
        sidecar = await stack.enter_async_context(Sidecar(SidecarConfig(
            decode_url=f"http://{decode.address}", host="127.0.0.1", port=0, prefill_pods=(),
            picker_secret=secret.read_bytes().strip())))
        cfg = picker_config([], {"handler": {"type": "prefill-decode", "decider": "threshold"}}, debug_headers=True,
                            prefill_signing_secret_file=str(secret) if signing else None)
        # the pool: the prefill engine and the decode pod's sidecar
        cfg.endpoints = [EndpointConfig(address=prefill.address, role="prefill",
                                        metrics_url=f"http://{prefill.address}/metrics"),
                         EndpointConfig(address=sidecar.address, role="decode",
                                        metrics_url=f"http://{decode.address}/metrics")]
        picker = await stack.enter_async_context(running_picker(cfg))
        envoy = await stack.enter_async_context(EnvoyProcess(EnvoyConfigOptions(
            picker=picker.address, endpoints=[sidecar.address, prefill.address])))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.post(envoy.url + "/v1/completions",
                                json={"model": SIM_MODEL, "prompt": LONG, "max_tokens": 4}) as r:
            text = await r.text()
            assert r.headers.get("x-kvswitch-prefill-endpoint") == prefill.address, dict(r.headers)
            if signing:
                assert r.status == 200, text
                assert r.headers["x-kvswitch-endpoint"] == sidecar.address
            else:
                assert r.status == 403, text  # the sidecar refused the unsigned target
                assert "allow list" in text
        async with session.get(f"http://{prefill.address}/metrics") as m:
            served = sum(float(line.rsplit(" ", 1)[1]) for line in (await m.text()).splitlines()
                         if line.startswith("vllm:request_success_total"))
        assert served == (1.0 if signing else 0.0)  # the prefill pod saw the leg only when it was signed
