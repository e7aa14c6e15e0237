"""Envoy + picker + pods wired together for one test: ``async with envoy_stack(...) as stack``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from e2e.support.envoy import EnvoyProcess
from e2e.support.picker import LEAST_INFLIGHT, picker_config, running_picker
from extproc.envoyconfig.builder import EnvoyConfigOptions
from extproc.responselog import SUPERSEDED
from extproc.server import Server, build_scheduler
from pickers.director import Director
from pickers.types import Decision, InferenceRequest, Usage


@dataclass
class RecordingScheduler:
    """Wraps the director and records what the hooks were told (for assertions in tests)."""

    inner: Director
    requests: list[InferenceRequest] = field(default_factory=list)
    routed: list[tuple[float, str]] = field(default_factory=list)  # (perf_counter, first endpoint) per decision
    served: list[str] = field(default_factory=list)
    first_tokens: int = 0
    finished: list[Usage | None] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    order: list[str] | None = None  # force this fallback list (tests of the gateway's fallback walk)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def ready(self) -> bool:
        return self.inner.ready()

    async def route(self, request: InferenceRequest) -> Decision:
        self.requests.append(request)
        decision = await self.inner.route(request)
        if self.order is not None:
            decision.endpoints = list(self.order)
        if len(self.routed) < 100_000:
            self.routed.append((time.perf_counter(), decision.endpoints[0]))
        return decision

    async def ended(self, n: int, timeout: float = 10.0) -> None:
        """Until the picker has heard of ``n`` ended requests (finished or failed). In the default
        access-log mode the outcome comes in Envoy's access-log entry just after the client's last byte."""
        sched = self
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(sched.finished) + len(sched.failed) < n:
            if loop.time() > deadline:
                raise AssertionError(f"{len(sched.finished) + len(sched.failed)} of {n} requests ended "
                                     f"within {timeout}s")
            await asyncio.sleep(0.01)

    def on_served(self, decision: Decision, served: str) -> None:
        self.served.append(served)
        self.inner.on_served(decision, served)

    def on_first_token(self, decision: Decision, at: float) -> None:
        self.first_tokens += 1
        self.inner.on_first_token(decision, at)

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        self.finished.append(usage)
        self.inner.on_finished(decision, usage, at)

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        # A decision voided because Envoy replayed the request's ext_proc stream is not a failed response:
        # the replay's decision carries the request (kept apart so tests can still see it happened).
        (self.superseded if reason == SUPERSEDED else self.failed).append(reason)
        self.inner.on_failed(decision, reason, at)


@dataclass
class Stack:
    envoy: EnvoyProcess
    picker: Server
    scheduler: RecordingScheduler

    @property
    def url(self) -> str:
        return self.envoy.url

    async def ended(self, n: int, timeout: float = 10.0) -> None:
        await self.scheduler.ended(n, timeout)


@contextlib.asynccontextmanager
async def envoy_stack(
    pool: list[str],
    picker_endpoints: list[str] | None = None,
    fail_open: bool = False,
    server: dict[str, Any] | None = None,
    extra_http_filters: list[dict[str, Any]] | None = None,
    order: list[str] | None = None,
    simple: bool = True,
    envoy: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Picker (in-process) + Envoy (override-host over ``pool``).

    ``simple``: the least-inflight profile (reads no pod metrics, so it fronts any upstream); False: the
    default profile, which scrapes vLLM metrics and so needs simulator or vLLM pods. ``envoy``: more
    EnvoyConfigOptions fields (``picker_protocol: ext-authz`` asks the picker's decide port). ``scheduler``: a
    whole ``scheduler:`` section instead (e.g. admission rules).
    """
    cfg = picker_config(picker_endpoints if picker_endpoints is not None else pool,
                        scheduler if scheduler is not None else LEAST_INFLIGHT if simple else None,
                        **{"debug_headers": True, **(server or {})})
    inner = build_scheduler(cfg)
    sched = RecordingScheduler(inner, order=order)
    async with running_picker(cfg, sched) as picker:
        more = dict(envoy or {})
        if more.get("picker_protocol") == "ext-authz" and not more.get("picker_decide"):
            more["picker_decide"] = [f"127.0.0.1:{picker.decide_port}"]  # the picker's ext_authz front
        opts = EnvoyConfigOptions(picker=picker.address, endpoints=pool, fail_open=fail_open,
                                  extra_http_filters=extra_http_filters or [], **more)
        async with EnvoyProcess(opts) as envoy:
            yield Stack(envoy, picker, sched)
