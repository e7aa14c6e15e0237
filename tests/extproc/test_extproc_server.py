"""The gRPC server: health services, readiness tied to endpoints, a real ext_proc stream, drain on stop."""

from __future__ import annotations

import asyncio

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from e2e.support.extproc_fakes import REQUEST_HEADERS, body, headers
from e2e.support.picker import picker_config, running_picker
from e2e.support.waits import until

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _status(addr: str, service: str) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return r.status


async def test_health_and_readiness():
    async with running_picker(picker_config([])) as srv:
        assert await _status(srv.address, "liveness") == SERVING
        assert await _status(srv.address, "") == SERVING
        assert await _status(srv.address, "readiness") != SERVING
        assert await _status(srv.address, "envoy.service.ext_proc.v3.ExternalProcessor") != SERVING
    async with running_picker(picker_config(["10.0.0.1:8000"])) as srv:
        assert await _status(srv.address, "readiness") == SERVING
        assert await _status(srv.address, "envoy.service.ext_proc.v3.ExternalProcessor") == SERVING


async def test_ext_proc_stream_over_grpc_and_drain():
    async with running_picker(picker_config(["10.0.0.1:8000"])) as srv:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(headers(REQUEST_HEADERS))
            await call.write(body(orjson.dumps({"model": "m", "prompt": "x"}), True))
            first = await call.read()
            assert first.request_headers.response.header_mutation.set_headers[0].header.raw_value == b"10.0.0.1:8000"
            assert (await call.read()).request_body.response.body_mutation.streamed_response.end_of_stream
            # stop while this stream is open: health goes NOT_SERVING and the open stream may still finish
            stopping = asyncio.create_task(srv.stop(2.0))
            await until(lambda: srv.stopping)
            await call.write(headers({":status": "200"}, response=True, end_of_stream=True))
            assert (await call.read()).HasField("response_headers")
            await call.done_writing()
            await stopping
        assert srv.processor.active == 0


def test_serve_with_its_metrics_port_taken_exits_2_with_one_clear_line():
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "extproc.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", str(port), "--endpoint", "127.0.0.1:9"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
