"""``kvswitch up``'s scale target: the live planner starts and stops simulated pods of the local fleet.

A pod asked for is started at once (its HTTP port, KV-event publisher and engine) and becomes routable (an
endpoint in the picker's table, scraped like the others) after ``startup_s`` wall seconds, the stand-in for
a model server's cold start. Releasing a pod stops it; the planner releases a pod only after draining it
(pickers/planner/live.py), so the stop cuts no request. Envoy reaches new pods through an ORIGINAL_DST
cluster (the picker names the pod), so its configuration does not change as the fleet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from engine.sim.server import SimPod
from engine.sim.spec import PodSpec

if TYPE_CHECKING:
    from extproc.localstack.stack import LocalStack

log = logging.getLogger("kvswitch.up")


class LocalFleetTarget:
    """``ScaleTarget`` (pickers/planner/live.py) over a running ``LocalStack``'s fleet (pods of role both)."""

    def __init__(self, stack: LocalStack, startup_s: float = 0.0) -> None:
        self.stack = stack
        self.startup_s = startup_s
        self._starting: dict[str, tuple[str, asyncio.Task[None]]] = {}  # pod name -> (kind, its start)
        self._seq = len(stack.pods)
        self.started = 0  # pods this target started (for reports and tests)
        self.released: list[str] = []  # addresses it stopped, in order (bounded by the pods it started)

    def _owned(self, kind: str) -> list[str]:
        return [p.name for p in self.stack.pods
                if p.role == "both" and self.stack.fleet[p.name].spec.accelerator.upper() == kind]

    async def requested(self, kind: str) -> int | None:
        return len(self._owned(kind)) + sum(1 for k, _ in self._starting.values() if k == kind)

    async def scale(self, kind: str, replicas: int) -> None:
        have = await self.requested(kind) or 0
        if replicas > have:
            for _ in range(replicas - have):
                name = f"pod-{self._seq}"
                self._seq += 1
                self._starting[name] = (kind, asyncio.get_running_loop().create_task(
                    self._start(name, kind), name=f"start {name}"))
        elif replicas < have:  # only pods still starting go this way (routable ones are drained and released)
            names = [n for n, (k, _) in self._starting.items() if k == kind][::-1][: have - replicas]
            for n in names:
                _, task = self._starting.pop(n)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _start(self, name: str, kind: str) -> None:
        stack = self.stack
        template = stack.fleet.pods[0].spec if stack.fleet.pods else PodSpec()
        spec = dataclasses.replace(template, name=name, role="both", accelerator=kind, port=0)
        pod = SimPod(spec, stack.fleet.pods[0].tokenizer if stack.fleet.pods else None, stack.options.time_scale,
                     stack.fleet.peers)
        try:
            await pod.start()
            await asyncio.sleep(self.startup_s)
        except BaseException:
            await pod.stop()
            raise
        stack.add_pod(pod)
        self.started += 1
        self._starting.pop(name, None)
        log.info("planner: %s (%s) at %s is serving", name, kind, pod.address)

    async def release(self, kind: str, address: str) -> None:
        await self.stack.remove_pod(address)
        self.released.append(address)

    def describe(self) -> str:
        return "the local simulated fleet"

    async def close(self) -> None:
        tasks = [t for _, t in self._starting.values()]
        self._starting.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


__all__ = ["LocalFleetTarget"]
