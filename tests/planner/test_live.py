"""The live planner on a real director (no network): hysteresis, cooldown, drain-first ordering, drain
deadline, bad configuration, and the Kubernetes target against the fake API server.

Traffic goes through the director's own decisions and hooks (``route`` -> ``on_first_token`` ->
``on_finished``); time is a ManualClock the test advances; the scale target is an in-memory one that adds
routable endpoints at once (or the Kubernetes target on ``e2e/support/fakekube.py``).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from e2e.support.fakekube import FakeKubeApi
from extproc.config import ConfigError, config_from_dict
from pickers.clock import ManualClock
from pickers.datalayer.k8s import KubernetesDiscovery, KubernetesDiscoverySettings
from pickers.datalayer.kubeapi import KubeApi
from pickers.director import Director
from pickers.planner.capacity import LoadShape, PodKind, pod_capacity
from pickers.planner.kube import DELETION_COST, KubernetesTarget
from pickers.planner.live import LivePlanner
from pickers.planner.settings import PlannerSettings, planner_settings
from pickers.types import Endpoint, InferenceRequest, Usage
from tests.pickers.helpers import scheduler

PROMPT_TOKENS = 4000
OUT = 64


class MemoryTarget:
    """Pods appear in the table the moment they are asked for; releases are recorded with the clock."""

    def __init__(self, director: Director, clock: ManualClock, kind: str = "L40S") -> None:
        self.director = director
        self.clock = clock
        self.kind = kind
        self.next_ip = 100
        self.scales: list[tuple[float, int]] = []
        self.released: list[tuple[float, str]] = []

    def _pods(self) -> list[str]:
        t = self.director.dl.endpoints
        return [a for a in t.by_pod if a not in {r for _, r in self.released}]

    async def requested(self, kind: str) -> int | None:
        return len(self._pods())

    async def scale(self, kind: str, replicas: int) -> None:
        self.scales.append((self.clock.now(), replicas))
        for _ in range(replicas - len(self._pods())):
            self.next_ip += 1
            self.director.add_endpoint(Endpoint(f"10.0.1.{self.next_ip}:8000", accelerator=kind))

    async def release(self, kind: str, address: str) -> None:
        self.released.append((self.clock.now(), address))

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return "memory"


def settings(**kw) -> PlannerSettings:
    base = {"interval_s": 10, "accelerators": "L40S", "startup_s": 0, "down_after_s": 60, "cooldown_s": 30,
            "min_replicas": 1, "max_replicas": 16, "drain_timeout_s": 100}
    return planner_settings({**base, **kw})


def planner_on(pods: int = 1, **kw) -> tuple[LivePlanner, Director, ManualClock, MemoryTarget]:
    eps = [Endpoint(f"10.0.0.{i + 1}:8000", accelerator="L40S") for i in range(pods)]
    director, clock = scheduler({"profile": "load-only"}, eps)
    target = MemoryTarget(director, clock)
    lp = LivePlanner(settings(**kw), director.dl, clock, target, registry=CollectorRegistry(), poll_s=0.001)
    director.add_observer(lp.observer)
    return lp, director, clock, target


class Traffic:
    """Requests through the director: ``arrive(n)`` routes n requests; ``finish_all()`` ends them."""

    def __init__(self, director: Director, clock: ManualClock) -> None:
        self.director = director
        self.clock = clock
        self.open: list = []
        self.n = 0

    def arrive(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            req = InferenceRequest(request_id=f"r{self.n}", model="m", max_tokens=OUT, arrival=self.clock.now(),
                                   prompt_token_ids=[self.n % 50 + 1] * PROMPT_TOKENS)
            d = self.director.decide(req)
            self.director.on_first_token(d, self.clock.now() + 0.1)
            self.open.append(d)

    def finish_all(self) -> None:
        for d in self.open:
            self.director.on_finished(d, Usage(PROMPT_TOKENS, OUT), self.clock.now())
        self.open.clear()


def capacity() -> float:
    shape = LoadShape.from_lengths([PROMPT_TOKENS] * 8, [OUT] * 8)
    return pod_capacity(PodKind("L40S", "llama-3.1-8b"), shape, 2.0, 0.06, 0.95)


async def run_interval(lp: LivePlanner, clock: ManualClock, traffic: Traffic, rate: float) -> dict[str, int]:
    """One interval at ``rate`` requests/s (all of them end within it), then the decision."""
    traffic.arrive(round(rate * lp.settings.interval_s))
    traffic.finish_all()
    clock.set(clock.now() + lp.settings.interval_s)
    desired = await lp.tick()
    await lp.drained()
    return desired


async def test_scale_up_follows_the_cost_model_at_once():
    lp, director, clock, target = planner_on()
    lp._last_tick = clock.now()
    traffic = Traffic(director, clock)
    rate = 3.0
    want = math.ceil(rate / (capacity() * 0.8))
    assert want >= 3
    got = await run_interval(lp, clock, traffic, rate)
    assert got == {"L40S": want} and target.scales == [(clock.now(), want)]
    assert len(director.dl.endpoints.by_pod) == want
    text = lp.metrics.desired.labels("both", "L40S")._value.get()
    assert text == want


async def test_hysteresis_a_rate_that_dips_and_returns_moves_nothing():
    lp, director, clock, target = planner_on(down_after_s=60, cooldown_s=0)
    lp._last_tick = clock.now()
    traffic = Traffic(director, clock)
    high = (await run_interval(lp, clock, traffic, 3.0))["L40S"]
    for _ in range(3):
        await run_interval(lp, clock, traffic, 3.0)
    # 30 s low, 40 s high, twice: the forecast's level (a mean of the last 4 intervals) stays low for about
    # 50 s of each cycle, never for down_after_s (60 s) in a row, so nothing moves
    for i in range(14):
        got = await run_interval(lp, clock, traffic, 0.3 if i % 7 < 3 else 3.0)
        assert got["L40S"] == high, f"interval {i}: desired moved to {got} on a dip shorter than down_after_s"
    assert not target.released and [n for _, n in target.scales] == [high]
    # low for longer than down_after_s: one step down, drain-first
    t_low = clock.now()
    downs = []
    for _ in range(10):
        got = await run_interval(lp, clock, traffic, 0.3)
        downs.append((clock.now(), got["L40S"]))
    first_down = next(t for t, n in downs if n < high)
    assert first_down - t_low >= 60
    assert len({n for _, n in downs if n < high}) == 1, f"more than one step down: {downs}"
    assert len(target.released) == high - downs[-1][1]


async def test_cooldown_no_scale_down_sooner_than_cooldown_after_the_last_change():
    lp, director, clock, target = planner_on(down_after_s=0, cooldown_s=50)
    lp._last_tick = clock.now()
    traffic = Traffic(director, clock)
    await run_interval(lp, clock, traffic, 3.0)
    t_up = clock.now()
    seen = []
    for _ in range(8):
        seen.append((clock.now() + lp.settings.interval_s, (await run_interval(lp, clock, traffic, 0.2))["L40S"]))
    first_down = next(t for t, n in seen if n < seen[0][1])
    assert first_down - t_up >= 50, seen
    assert first_down - t_up < 50 + 2 * lp.settings.interval_s, seen


async def test_drain_order_fewest_in_flight_first_and_release_only_after_requests_end():
    lp, director, clock, target = planner_on(pods=3, drain_timeout_s=100)
    dl = director.dl
    addrs = list(dl.endpoints.by_pod)
    # in flight: pod 0 holds 2, pod 1 none, pod 2 one
    for i, (addr, n) in enumerate(zip(addrs, (2, 0, 1), strict=True)):
        for j in range(n):
            dl.inflight.add(f"held-{i}-{j}", dl.endpoints.slot(addr), None, 100, 10, clock.now())
    assert lp.drain_order(addrs) == [addrs[1], addrs[2], addrs[0]]
    obs = await lp.observe(clock.now())
    await lp.apply({"L40S": 1}, obs)  # remove two pods
    table = dl.endpoints
    assert table.is_draining(addrs[1]) and table.is_draining(addrs[2]) and not table.is_draining(addrs[0])
    # no new decision goes to a draining pod
    for k in range(20):
        d = director.decide(InferenceRequest(request_id=f"n{k}", model="m", prompt_token_ids=[1] * 64))
        assert d.primary == addrs[0]
        director.on_finished(d, None, clock.now())
    await asyncio.sleep(0.05)
    assert [a for _, a in target.released] == [addrs[1]], "the idle pod goes at once, the busy one waits"
    assert table.slot(addrs[2]) is not None
    dl.inflight.finish("held-2-0")
    await lp.drained()
    assert [a for _, a in target.released] == [addrs[1], addrs[2]]
    assert table.slot(addrs[1]) is None and table.slot(addrs[2]) is None
    recs = {r.address: r for r in lp.drains}
    assert recs[addrs[2]].inflight_at_drain == 1 and not recs[addrs[2]].timed_out
    assert lp.metrics.drains.labels("idle")._value.get() == 2


async def test_a_stuck_request_is_released_at_the_drain_deadline():
    lp, director, clock, target = planner_on(pods=2, drain_timeout_s=30)
    dl = director.dl
    a, b = list(dl.endpoints.by_pod)
    dl.inflight.add("stuck", dl.endpoints.slot(b), None, 100, 10, clock.now())
    dl.inflight.add("other", dl.endpoints.slot(a), None, 100, 10, clock.now())
    dl.inflight.add("other2", dl.endpoints.slot(a), None, 100, 10, clock.now())
    lp.start_drain("L40S", b)
    await asyncio.sleep(0.02)
    assert not target.released
    clock.set(clock.now() + 31)
    await lp.drained()
    assert [x for _, x in target.released] == [b] and lp.drains[-1].timed_out
    assert lp.metrics.drains.labels("timeout")._value.get() == 1


@pytest.mark.parametrize("raw,why", [
    ({"interval_s": 0}, "planner.interval_s: must be a positive"),
    ({"slo": {"goal": 1.5}}, "planner.slo.goal"),
    ({"slo": {"ttft_ms": -1}}, "planner.slo.ttft_ms"),
    ({"utilization": 0}, "planner.utilization"),
    ({"cooldown_s": -5}, "planner.cooldown_s: must be >= 0"),
    ({"min_replicas": 4, "max_replicas": 2}, "planner.max_replicas"),
    ({"accelerators": "H100=cheap"}, "planner.accelerators: price of H100 must be a number"),
    ({"accelerators": "TPU9"}, "planner.accelerators: unknown kind"),
    ({"model_profile": "gpt-9"}, "planner.model_profile: unknown model profile"),
    ({"interval": 5}, "unknown field `interval`"),
    ({"target": {"kubernetes": {}}}, "deployments: name at least one"),
    ({"target": {"kubernetes": {"deployments": [{"name": "a"}, {"name": "b"}]}}}, "a second Deployment"),
    ({"accelerators": "L40S", "target": {"kubernetes": {"deployments": [{"name": "a", "accelerator": "H100"}]}}},
     "H100 is not in planner.accelerators"),
    ({"target": {"kubernetes": {"deployments": [{"name": "a", "role": "decode"}]}}}, "role"),
])
def test_bad_planner_config_is_one_clear_error(raw, why):
    with pytest.raises(ConfigError, match=why):
        config_from_dict({"planner": raw})


def test_bad_planner_config_stops_serve_before_anything_starts(tmp_path, capsys):
    from extproc.serve import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("planner: {slo: {goal: 7}}\n")
    assert main(["--config", str(cfg), "--endpoint", "127.0.0.1:1", "--port", "0"]) == 2
    assert "planner.slo.goal: must be in (0, 1], got 7" in capsys.readouterr().err


async def test_planner_in_up_refuses_several_pickers_and_a_foreign_target(tmp_path):
    from extproc.localstack import LocalStack, StackOptions

    cfg = tmp_path / "p.yaml"
    cfg.write_text("planner: {interval_s: 1}\n")
    with pytest.raises(ConfigError, match="--pickers 1"):
        await LocalStack(StackOptions(pickers=2, port=0, config_file=str(cfg))).start()
    cfg.write_text("planner: {target: {kubernetes: {deployments: [{name: x}]}}}\n")
    with pytest.raises(ConfigError, match="scales its own simulated fleet"):
        await LocalStack(StackOptions(port=0, config_file=str(cfg))).start()


# ---- Kubernetes: the Deployment's scale, the pod chosen, discovery kept from re-adding it ----------------
async def until(cond, timeout: float = 10.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def test_kubernetes_target_scales_the_deployment_and_removes_the_drained_pod(tmp_path: Path):
    async with FakeKubeApi() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        labels = {"app": "vllm", "kvswitch.io/accelerator": "L40S"}
        api.set_pool("pool", {"app": "vllm"}, [8000])
        api.add_deployment("vllm-l40s", {"app": "vllm"}, 3)
        for i in range(3):
            api.add_pod(f"vllm-{i}", labels, ip=f"10.1.0.{i + 1}", ready=True)
        made = []
        api.on_scale_up = lambda name, n: made.append((name, n))
        director, _ = scheduler({"profile": "load-only"}, [])
        table = director.dl.endpoints
        disco = KubernetesDiscovery(KubernetesDiscoverySettings(pool="pool", kubeconfig=str(kubeconfig),
                                                                reap_interval_s=0.02))
        task = asyncio.create_task(disco.run(table))
        try:
            await until(lambda: len(table.active_slots()) == 3, what="three pods discovered")
            s = settings(target={"kubernetes": {"deployments": [{"name": "vllm-l40s", "accelerator": "L40S"}]}})
            target = KubernetesTarget(s.target.kubernetes, "default",  # type: ignore[arg-type]
                                      lambda: KubeApi.connect(str(kubeconfig)))
            from pickers.clock import MonotonicClock

            lp = LivePlanner(s, director.dl, MonotonicClock(), target, registry=CollectorRegistry(), poll_s=0.01)
            # scale up: the Deployment's replicas
            obs = await lp.observe(0.0)
            assert obs.pools["L40S"].ready == 3 and obs.pools["L40S"].starting == 0
            await lp.apply({"L40S": 5}, obs)
            assert api.deployments[("default", "vllm-l40s")]["replicas"] == 5 and made == [("vllm-l40s", 2)]
            obs = await lp.observe(1.0)
            assert obs.pools["L40S"].starting == 2  # asked for, not routable yet
            # scale down to 2: the two starting pods go first (no request on them), then one ready pod, drained
            busy = "10.1.0.1:8000"
            for addr in table.by_pod:
                n = 2 if addr == busy else 1
                for j in range(n):
                    director.dl.inflight.add(f"{addr}-{j}", table.slot(addr), None, 10, 10, 0.0)
            await lp.apply({"L40S": 2}, obs)
            victim = next(r.address for r in lp.drains)
            assert victim != busy
            assert api.deployments[("default", "vllm-l40s")]["replicas"] == 3
            await asyncio.sleep(0.2)
            # still serving its request: not released, not deleted, and discovery does not bring it back
            assert table.is_draining(victim) and len(api.objects["pods"]) == 3
            director.dl.inflight.finish(f"{victim}-0")
            await lp.drained()
            ips = [p["status"].get("podIP") for p in api.objects["pods"].values()]
            assert victim.split(":")[0] not in ips, "the drained pod was not the one deleted"
            assert api.deployments[("default", "vllm-l40s")]["replicas"] == 2 and len(api.objects["pods"]) == 2
            annotated = [b for path, b in api.patches if "/pods/" in path]
            assert annotated and annotated[0]["metadata"]["annotations"][DELETION_COST] == str(-(2**31))
            await asyncio.sleep(0.2)
            assert table.slot(victim) is None and len(table.active_slots()) == 2
            await lp.stop()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_serve_builds_the_planner_from_its_config_and_publishes_the_gauges():
    from prometheus_client import REGISTRY

    from extproc.serve import build_planner
    from extproc.server import build_scheduler

    cfg = config_from_dict({"endpoints": [{"address": "10.0.0.9:8000", "accelerator": "H200"}],
                            "planner": {"interval_s": 5, "min_replicas": 2, "max_replicas": 3}})
    director = build_scheduler(cfg)
    lp = build_planner(cfg, director)
    assert lp is not None and lp.target is None and lp.catalogue.kinds == ["H200"]
    assert lp.observer.on_routed in director._on_routed  # the director calls the planner's hooks
    assert await lp.tick() == {"H200": 2}  # no traffic yet: min_replicas
    assert REGISTRY.get_sample_value("kvswitch_planner_desired_replicas",
                                     {"role": "both", "accelerator": "H200"}) == 2
    assert REGISTRY.get_sample_value("kvswitch_planner_replicas",
                                     {"role": "both", "accelerator": "H200", "state": "ready"}) == 1
    assert build_planner(config_from_dict({}), director) is None


async def test_discovery_keeps_a_held_pod_out_and_adds_it_back_when_the_hold_lapses(tmp_path: Path):
    async with FakeKubeApi() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        api.set_pool("pool", {"app": "vllm"}, [8000])
        now = [100.0]
        table = scheduler({"profile": "load-only"}, [])[0].dl.endpoints
        disco = KubernetesDiscovery(KubernetesDiscoverySettings(pool="pool", kubeconfig=str(kubeconfig),
                                                                reap_interval_s=0.02), clock=lambda: now[0])
        table.hold("10.1.0.7:8000", 130.0)  # the planner removed the pod that had this IP
        task = asyncio.create_task(disco.run(table))
        try:
            api.add_pod("a", {"app": "vllm"}, ip="10.1.0.6", ready=True)
            api.add_pod("b", {"app": "vllm"}, ip="10.1.0.7", ready=True)  # a new pod got the IP
            await until(lambda: table.slot("10.1.0.6:8000") is not None, what="the other pod added")
            await asyncio.sleep(0.1)
            assert table.slot("10.1.0.7:8000") is None  # held
            now[0] = 131.0  # no new event: the lapse alone brings it in
            await until(lambda: table.slot("10.1.0.7:8000") is not None, what="added once the hold lapsed")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
