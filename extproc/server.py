"""The ext_proc gRPC server: ExternalProcessor servicer, gRPC health, metrics port, graceful drain.

    server = build_server(config, scheduler)      # config: extproc.config.Config
    await server.start()                           # binds; server.port / server.metrics_port are now known
    ...
    await server.stop()                            # NOT_SERVING, stop accepting, drain up to drain_seconds

The server talks to the picker only through ``pickers.types.Scheduler`` (pickers.director.Director):
start/stop/ready for its lifecycle and readiness, ``route`` and the response hooks from each stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from extproc import metrics
from extproc.authz import AuthzFront, hold_limit_s
from extproc.budget import ByteBudget
from extproc.config import Config, ConfigError
from extproc.contextcap import context_cap_bytes
from extproc.responselog import AccessLogReceiver, PendingResponses
from extproc.stream import ExtProcStream, StreamSettings
from extproc.tls import bind
from pickers.clock import Clock, MonotonicClock
from pickers.config import build_scheduler as framework_build
from pickers.director import Director
from pickers.types import Scheduler

log = logging.getLogger("kvswitch.extproc")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Calls that reached the server and wait for the application to take them: a burst of new ext_proc streams
# (one per request) while the event loop is busy. Past gRPC core's default of 1,000 such calls, core drops new
# ones at random, surely at its hard limit (3,000): the client reads CANCELLED, Envoy a reset stream, and the
# request gets the fail-closed 500, before kvswitch sees it. Measured (grpc 1.85.3, the loop blocked 3 s while
# a client sent its calls): 5 of 1,100 and 52-63 of 1,500 dropped; through the real Envoy with both cores
# busy, 1-2 of 1,100 requests sent at once in 4 of 10 runs (e2e/test_envoy_hardening.py's pool test sending
# them all at once), none in 10 runs with this queue. Envoy lets hardening.UNCAPPED requests through to a
# picker; these calls are held in core's memory, so the queue stays bounded: drops begin past 16,384 waiting
# calls, and every call past 32,768 is dropped.
MAX_PENDING_CALLS = 16_384
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
]


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """One ExtProcStream per gRPC stream; replies go back in the order the state machine returns them."""

    def __init__(self, scheduler: Scheduler, settings: StreamSettings, clock: Clock) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.clock = clock
        self.active = 0
        self.last_stream_at = 0.0  # loop time of the newest stream (stop() waits until Envoy sends no more)

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = ExtProcStream(self.scheduler, self.settings, self.clock)
        self.last_stream_at = asyncio.get_running_loop().time()
        self.active += 1
        metrics.STREAMS.inc()
        try:
            async for request in request_iterator:
                for reply in await stream.handle(request):
                    yield reply
        finally:
            stream.close()
            self.active -= 1
            metrics.STREAMS.dec()


def _secret(path: str | None) -> bytes | None:
    """The prefill-signing secret (the same file the sidecars read with --picker-secret-file)."""
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"server.prefill_signing_secret_file: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"server.prefill_signing_secret_file: {path} is empty")
    return secret


class Server:
    """The running picker: gRPC (ext_proc + health) and, unless disabled, the Prometheus port."""

    def __init__(self, config: Config, scheduler: Scheduler, clock: Clock | None = None,
                 manage_scheduler: bool = True) -> None:
        self.config = config
        self.scheduler = scheduler
        self.clock = clock or MonotonicClock()
        self.manage_scheduler = manage_scheduler
        s = config.server
        # access-log: routed requests wait in ``pending`` for Envoy's access-log entry (their outcome)
        self.pending = PendingResponses() if s.response_body == "access-log" else None
        if self.pending is not None and isinstance(scheduler, Director):
            scheduler.predicted_first_token = True  # no first token while a request runs: predict it
        if isinstance(scheduler, Director) and not s.debug_headers and not log.isEnabledFor(logging.DEBUG):
            scheduler.explain = False  # no x-kvswitch-explanation to write and no debug log: skip the work
        self.processor = ExternalProcessor(
            scheduler, StreamSettings(s.body_limit_bytes, s.debug_headers, dict(s.model_rewrite),
                                      s.response_body == "observe",
                                      detached=s.response_body in ("detach", "access-log"),
                                      pending=self.pending,
                                      offload_min_bytes=s.offload_min_bytes,
                                      budget=ByteBudget(s.offload_budget_bytes),
                                      prefill_secret=_secret(s.prefill_signing_secret_file),
                                      context_cap_bytes=context_cap_bytes(  # rel2 (issue 14)
                                          s.context_cap_bytes, {e.model_profile for e in config.endpoints}),
                                      hold_limit_s=hold_limit_s(s.decide_timeout_s)),
            self.clock
        )
        # The ext_authz front (extproc/authz.py): the same routing over plain HTTP, one request per request.
        settings = self.processor.settings
        # Held requests are decided before Envoy gives up on the answer (server.decide_timeout_s), on either front.
        authz_routing = replace(settings.routing(), can_rewrite=False)
        self.authz = AuthzFront(scheduler, authz_routing, self.clock, self.pending, s.body_limit_bytes,
                                settings.context_cap_bytes, s.debug_headers) if config.decide_port() >= 0 else None
        self.decide_port: int | None = None
        self.health = health_aio.HealthServicer()
        self.port: int = 0
        self.transport = "plaintext"  # or "tls" / "tls-self-signed" (extproc/tls.py)
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None  # server.health_port: plaintext health for kubelet
        self.health_port: int | None = None
        self._metrics_httpd: WSGIServer | None = None
        self._ready_task: asyncio.Task | None = None
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """True once ``stop`` began: health says NOT_SERVING, open streams drain."""
        return self._stopping

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the scheduler, the gRPC server and the metrics port; on any failure undo what started."""
        try:
            await self._start()
        except BaseException:
            await self._undo_start()
            raise

    async def _undo_start(self) -> None:
        if self.authz is not None:
            await self.authz.stop(0)
        if self._grpc is not None:
            await self._grpc.stop(0)
            self._grpc = None
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
            self._health_grpc = None
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None
        if self.manage_scheduler:
            await self.scheduler.stop()

    async def _start(self) -> None:
        s = self.config.server
        if self.manage_scheduler:
            await self.scheduler.start()
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.pending is not None:
            als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(self.pending), server)
        self.port, self.transport = bind(server, f"{s.host}:{s.grpc_port}", s.tls_cert, s.tls_key,
                                         s.tls_self_signed)
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.grpc_port} (port in use?)")
        for name in ("", "liveness", EXT_PROC_SERVICE):
            await self.health.set(name, _SERVING)
        await self._update_readiness()
        await server.start()
        self._grpc = server
        if self.authz is not None:
            self.decide_port = await self.authz.start(s.host, self.config.decide_port())
            self.authz.ready = await self._update_readiness()
        if s.health_port >= 0:  # kubelet's gRPC probes speak plaintext only: a TLS picker needs this port
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self.health_port = hs.add_insecure_port(f"{s.host}:{s.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot listen on {s.host}:{s.health_port} (server.health_port in use?)")
            await hs.start()
            self._health_grpc = hs
        if s.metrics_port >= 0:
            from prometheus_client import start_http_server

            try:
                self._metrics_httpd, _ = start_http_server(s.metrics_port, addr=s.host)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {s.host}:{s.metrics_port}: {exc.strerror}") from None
            self.metrics_port = self._metrics_httpd.server_port
        self._ready_task = asyncio.create_task(self._watch_readiness(), name="kvswitch-readiness")
        log.info("kvswitch ext_proc listening on %s:%d (%s; ext_authz %s; metrics %s)", s.host, self.port,
                 self.transport, self.decide_port, self.metrics_port)

    async def _update_readiness(self) -> bool:
        ready = not self._stopping and self.scheduler.ready()
        status = _SERVING if ready else _NOT_SERVING
        await self.health.set("readiness", status)
        await self.health.set(EXT_PROC_SERVICE, status if not self._stopping else _NOT_SERVING)
        if self.authz is not None:
            self.authz.ready = ready
        return ready

    async def _watch_readiness(self) -> None:
        """Endpoints can come and go (discovery): re-check readiness twice a second."""
        while not self._stopping:
            await self._update_readiness()
            await asyncio.sleep(0.5)

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def _wait_until_moved_away(self) -> None:
        """Keep serving new streams while Envoy still sends them: its health check needs a couple of intervals
        to see NOT_SERVING, and a stream refused meanwhile is an empty 500 for a client. Done when no stream
        started for ``move_away_quiet_seconds``, or after ``move_away_seconds`` whatever happens."""
        s = self.config.server
        if s.move_away_seconds <= 0 or (self._grpc is None and self.authz is None):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.move_away_seconds
        start = loop.time()
        while True:
            now = loop.time()
            last = self.processor.last_stream_at
            if self.authz is not None:
                last = max(last, self.authz.last_request_at)
            quiet_since = max(last, start)
            if now - quiet_since >= s.move_away_quiet_seconds or now >= deadline:
                log.info("no new streams for %.1fs (or the %.1fs bound): stop accepting and drain",
                         now - quiet_since, s.move_away_seconds)
                return
            await asyncio.sleep(min(0.05, max(0.0, deadline - now)))

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, keep serving until Envoy moved away (bounded), then stop accepting streams and
        let open ones finish for up to ``grace`` seconds."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.server.drain_seconds if grace is None else grace
        if self.authz is not None:
            self.authz.ready = False  # its health check answers 503: Envoy moves away as from gRPC's NOT_SERVING
        await self.health.enter_graceful_shutdown()
        await self._wait_until_moved_away()
        if self._ready_task is not None:
            self._ready_task.cancel()
            try:
                await self._ready_task
            except asyncio.CancelledError:
                pass
        if self.authz is not None:
            await self.authz.stop(grace)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.pending is not None:
            self.pending.abandon_all()
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        if self.manage_scheduler:
            await self.scheduler.stop()


def build_server(config: Config, scheduler: Scheduler, clock: Clock | None = None,
                 manage_scheduler: bool = True) -> Server:
    """Construct (not start) the picker server; ``kvswitch up`` and tests use this in-process."""
    return Server(config, scheduler, clock, manage_scheduler)


def build_scheduler(config: Config, clock: Clock | None = None) -> Director:
    """The director from the picker configuration's ``scheduler`` section and endpoints."""
    return framework_build(config.scheduler, config.endpoint_objects(), clock or MonotonicClock(),
                           max_fallback=config.server.max_fallback)
