"""The virtual-time cluster simulator: exact timings on tiny traces, P/D flow, routing, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.costmodel import CostModel, prefill_pairs
from engine.sim.cluster import (
    BaseRouter,
    BlockTokens,
    ClusterSim,
    TraceRequest,
    fleet_from_flags,
    format_table,
    load_fleet,
    make_router,
    read_mooncake,
    shape_trace,
    summarize,
    trace_prompts,
)
from engine.sim.cluster.cli import main as replay_main
from pickers.types import SchedulingError

TRACE = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")
COST = CostModel("8b", "H100")


def tr(i: int, at: float, n_in: int, n_out: int, ids: list[int]) -> TraceRequest:
    return TraceRequest(i, at, n_in, n_out, ids)


def run(reqs, pods=1, policy="round-robin", pd=None, router=None, **kw):
    fleet = fleet_from_flags(pods, "H100", "8b", pd=pd, **kw)
    sim = ClusterSim(fleet, router or (lambda eps, clock: make_router(policy, eps, clock)))
    return sim, sim.run(trace_prompts(shape_trace(reqs)))


class SpyRouter(BaseRouter):
    name = "spy"

    def __init__(self, pods: list[str], wants_kv: bool = False, wants_metrics: bool = False) -> None:
        self.pods = pods
        self.wants_kv_events = wants_kv
        self.wants_metrics = wants_metrics
        self.calls: list[tuple] = []
        self.kv: list[tuple[str, float, list]] = []
        self.metrics: list[tuple[str, float]] = []

    def route(self, req, now):
        self.calls.append(("route", req.request_id, now))
        return self.pods[0], None

    def on_first_token(self, req, at):
        self.calls.append(("first", req.request_id, at))

    def on_finished(self, req, usage, at):
        self.calls.append(("finished", req.request_id, at, usage.prompt_tokens, usage.completion_tokens,
                           usage.cached_tokens))

    def on_failed(self, req, reason, at):
        self.calls.append(("failed", req.request_id, reason))

    def on_kv_events(self, pod, events, at):
        self.kv.append((pod, at, events))

    def on_metrics(self, pod, stats, at):
        self.metrics.append((pod, at))


def test_block_tokens_fixed_per_id_and_bounded():
    b = BlockTokens(max_blocks=4)
    first = b.get(7).copy()
    for i in range(10):
        b.get(100 + i)
    assert len(b) == 4
    assert np.array_equal(b.get(7), first)  # regenerated identically after eviction
    assert not np.array_equal(b.get(7), b.get(8))
    p = b.prompt([7, 8], 700, unique=0)
    assert len(p) == 700 and np.array_equal(p[:512], first) and np.array_equal(p[512:], b.get(8)[:188])


def test_shared_hash_ids_give_cached_full_blocks():
    reqs = [tr(0, 0.0, 1536, 4, [1, 2, 3]), tr(1, 5.0, 1536, 4, [1, 2, 9])]
    _, res = run(reqs)
    a, b = res.records
    assert (a.status, b.status) == ("ok", "ok")
    assert a.cached_tokens == 0
    assert b.cached_tokens == 1024  # the two shared 512-token blocks
    s = summarize(res)
    assert s["prefix_hit_rate"] == pytest.approx(1024 / 3072)


def test_ttft_on_idle_pod_is_the_cost_model_prefill_time():
    _, res = run([tr(0, 2.0, 1000, 3, [1, 2])])
    rec = res.records[0]
    assert rec.ttft == pytest.approx(COST.prefill_time(1000, 0), rel=1e-12)
    decode = [COST.step_time(1, prefill_pairs(1, c), c) for c in (1000, 1001)]  # two more tokens
    assert rec.e2e == pytest.approx(rec.ttft + sum(decode), rel=1e-12)
    s = summarize(res)
    assert s["tpot_mean_s"] == pytest.approx((rec.e2e - rec.ttft) / 2)


def test_the_late_p90_counts_the_requests_of_the_second_half_of_the_arrivals():
    """Four cold 4K prompts at once on one pod queue behind each other; four short ones after them, seconds
    apart, start on an idle pod: the run's p90 is a cold one, the late p90 that of the short ones, each one
    prefill on an idle pod."""
    reqs = [tr(i, 0.0, 4096, 2, [10 * i + k for k in range(8)]) for i in range(4)]
    reqs += [tr(4 + i, 10.0 + 2.0 * i, 600, 2, [100 + i]) for i in range(4)]
    _, res = run(reqs)
    s = summarize(res)
    late = [r.ttft for r in res.records if r.arrival >= 8.0]
    assert late == pytest.approx([COST.prefill_time(600, 0)] * 4, rel=1e-9)
    assert s["ttft_p90_late_s"] == pytest.approx(float(np.percentile(late, 90)))
    assert s["ttft_p90_s"] > 3 * s["ttft_p90_late_s"]
    assert "TTFT p90 late ms" in format_table([s])


def test_arrivals_sorted_and_times_consistent():
    reqs = [tr(i, (7 - i) * 0.5, 600, 5, [i]) for i in range(8)]  # given in reverse order
    spy = SpyRouter(["10.0.0.0:8000"])
    _, res = run(reqs, router=spy)
    routed = [c for c in spy.calls if c[0] == "route"]
    assert [c[2] for c in routed] == sorted(c[2] for c in routed)
    assert [c[1] for c in routed] == [f"req-{i}" for i in range(7, -1, -1)]
    for r in res.records:
        assert r.arrival <= r.first_token <= r.finish and r.output_tokens == 5
    firsts = {c[1] for c in spy.calls if c[0] == "first"}
    fins = [c for c in spy.calls if c[0] == "finished"]
    assert len(firsts) == 8 and len(fins) == 8 and all(c[3] == 600 and c[4] == 5 for c in fins)


def test_round_robin_shares_are_equal():
    reqs = [tr(i, i * 0.01, 300, 2, [1000 + i]) for i in range(12)]
    _, res = run(reqs, pods=4)
    s = summarize(res)
    assert sorted(s["pod_share"].values()) == [0.25] * 4
    assert [r.decode_pod for r in res.records[:4]] == [p.name for p in res.pods]


def test_no_busy_stepping_idle_pods_do_not_step():
    reqs = [tr(0, 0.0, 600, 3, [1]), tr(1, 100.0, 600, 3, [2])]
    sim, res = run(reqs, pods=2)
    # one prefill step + two decode steps per request, nothing in the 100 s gap
    assert [p.steps for p in res.pods] == [3, 3]
    assert res.events < 20


def test_prompt_too_long_fails_with_400_and_reports_to_router():
    spy = SpyRouter(["10.0.0.0:8000"])
    _, res = run([tr(0, 0.0, 140000, 2, list(range(274)))], router=spy)  # 8b profile: 131072 max
    rec = res.records[0]
    assert rec.status == "failed" and rec.reason.startswith("400")
    assert ("failed", "req-0", rec.reason) in spy.calls
    assert summarize(res)["failed"] == 1


def test_router_rejection_is_recorded():
    class Reject(BaseRouter):
        name = "reject"

        def route(self, req, now):
            raise SchedulingError(429, "busy", "saturated")

    _, res = run([tr(0, 0.0, 100, 2, [1])], router=Reject())
    assert res.records[0].status == "rejected" and summarize(res)["rejected"] == 1


def test_pd_flow_pull_then_release_in_virtual_time():
    n = 2000
    sim, res = run([tr(0, 0.0, n, 3, [1, 2, 3, 4])], pd="1:1")
    rec = res.records[0]
    pre, dec = sim.pods
    assert (pre.spec.role, dec.spec.role) == ("prefill", "decode")
    assert rec.prefill_pod == pre.name and rec.decode_pod == dec.name
    t_pre = COST.prefill_time(n, 0)
    assert rec.prefill_done == pytest.approx(t_pre)
    expect = t_pre + COST.transfer_time(n, "rdma-400g") + COST.step_time(1, prefill_pairs(1, n - 1), n - 1)
    assert rec.ttft == pytest.approx(expect, rel=1e-9)
    assert rec.status == "ok" and rec.output_tokens == 3
    # the decode pod pulled, so the prefill pod released its held blocks long before the 30 s timeout
    assert pre.core.stats().num_held_blocks == 0
    assert res.end_time < 1.0
    assert dec.core.stats().prefix_queries == n


def test_kv_events_and_metrics_reach_the_router():
    spy = SpyRouter(["10.0.0.0:8000"], wants_kv=True, wants_metrics=True)
    fleet = fleet_from_flags(2, "H100", "8b")
    sim = ClusterSim(fleet, spy, scrape_interval=0.05)
    sim.run(trace_prompts([tr(0, 0.0, 320, 2, [5])]))
    assert spy.kv and spy.kv[0][0] == "10.0.0.0:8000"
    stored = [e for _, _, evs in spy.kv for e in evs if type(e).__name__ == "BlockStored"]
    assert sum(len(e.block_hashes) for e in stored) == 320 // 16
    times = sorted({t for _, t in spy.metrics})
    assert len(times) >= 2 and times[1] - times[0] == pytest.approx(0.05)
    assert {p for p, _ in spy.metrics} == {"10.0.0.0:8000", "10.0.0.1:8000"}


def test_least_inflight_adapter_balances():
    reqs = [tr(i, 0.0, 2000, 50, [2000 + i]) for i in range(8)]
    _, res = run(reqs, pods=4, policy="least-inflight")
    assert sorted(summarize(res)["pod_share"].values()) == [0.25] * 4


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy|profile"):
        run([tr(0, 0.0, 100, 2, [1])], policy="no-such-policy")


def test_fleet_yaml_uses_the_realtime_schema(tmp_path):
    f = tmp_path / "fleet.yaml"
    f.write_text("defaults: {model_profile: 8b}\npods:\n  - {count: 2, role: prefill, accelerator: H200}\n"
                 "  - {count: 3, role: decode, name: dec}\n")
    fleet = load_fleet(f)
    assert [p.role for p in fleet.pods] == ["prefill"] * 2 + ["decode"] * 3
    assert [p.label for p in fleet.pods][2:] == ["dec-0", "dec-1", "dec-2"]
    assert fleet.pods[0].accelerator == "H200" and len({p.name for p in fleet.pods}) == 5
    f.write_text("pods:\n  - {count: 1, colour: red}\n")
    with pytest.raises(ValueError, match="colour"):
        load_fleet(f)


def _copy(reqs):
    return [TraceRequest(r.index, r.arrival, r.input_length, r.output_length, r.hash_ids) for r in reqs]


@pytest.mark.skipif(not TRACE.exists(), reason="shared trace not present")
def test_real_trace_is_deterministic():
    reqs = read_mooncake(TRACE, max_requests=100)
    a, b = (summarize(run(_copy(reqs), pods=8, max_model_len=131072)[1]) for _ in range(2))
    assert a == b


@pytest.mark.skipif(not TRACE.exists(), reason="shared trace not present")
def test_real_trace_first_300_requests_replay():
    reqs = read_mooncake(TRACE, max_requests=300)
    _, res = run(reqs, pods=16, max_model_len=131072)
    s = summarize(res)
    too_long = sum(1 for r in reqs if r.input_length >= 131072)
    assert s["completed"] == 300 - too_long and s["failed"] == too_long
    assert s["prefix_hit_rate"] > 0 and math.isfinite(s["ttft_p99_s"])
    assert s["makespan_s"] >= reqs[-1].arrival
    assert "TTFT p50 ms" in format_table([s])


def test_cli_replay_writes_json_and_rejects_bad_input(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 100, "input_length": 700, "output_length": 3,
                                           "hash_ids": [i % 2, 10 + i]}) for i in range(6)) + "\n")
    out = tmp_path / "o.json"
    reqs_out = tmp_path / "r.jsonl"
    rc = replay_main([str(trace), "--pods", "2", "--policies", "round-robin,least-inflight", "--json", str(out),
                      "--requests-out", str(reqs_out), "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["round-robin", "least-inflight"]
    assert all(r["completed"] == 6 for r in data["runs"])
    lines = (tmp_path / "r.round-robin.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["status"] == "ok"
    table = capsys.readouterr().out
    assert "round-robin" in table and "least-inflight" in table
    assert replay_main([str(trace), "--pd", "x"]) == 2
    trace.write_text('{"timestamp": 0}\n')
    assert replay_main([str(trace)]) == 2
    assert "not a Mooncake record" in capsys.readouterr().err


def test_precise_picker_profile_follows_kv_events_to_the_cached_pod():
    ids = list(range(50, 58))
    reqs = [tr(0, 0.0, 4096, 2, ids), tr(1, 0.5, 4096, 2, [900]), tr(2, 5.0, 4608, 2, ids + [99])]
    _, res = run(reqs, pods=4, policy="precise")
    first, _, again = res.records
    assert again.decode_pod == first.decode_pod
    assert again.cached_tokens == 4096
    _, rr = run([TraceRequest(r.index, r.arrival, r.input_length, r.output_length, r.hash_ids) for r in reqs],
                pods=4, policy="round-robin")
    assert rr.records[2].cached_tokens == 0  # round-robin sent it elsewhere


@pytest.mark.parametrize("policy", ["precise", "default"])
def test_same_new_prefix_50ms_apart_shares_the_pod_before_any_kv_event(policy):
    """The second request arrives while the first's cold 4K prefill still runs (no BlockStored yet): the
    first's blocks are pending on its pod, so the second goes there instead of paying a second cold prefill."""
    ids = list(range(300, 308))  # 8 x 512 tokens: a 4K prefix nobody holds
    reqs = [tr(0, 0.0, 4096, 2, ids), tr(1, 0.05, 4608, 2, ids + [999])]
    _, res = run(reqs, pods=4, policy=policy)
    first, second = res.records
    assert first.first_token > second.arrival  # the first prefill had not finished when the second came
    assert second.decode_pod == first.decode_pod
    assert second.cached_tokens == 4096


@pytest.mark.parametrize("policy,wants", [("load-only", False), ("approximate", False), ("precise", True),
                                          ("default", True)])
def test_picker_profiles_get_kv_events_only_when_they_read_them(policy, wants):
    fleet = fleet_from_flags(2, "H100", "8b")
    sim = ClusterSim(fleet, lambda eps, clock: make_router(policy, eps, clock))
    assert sim.router.wants_kv_events is wants
    assert all(p.core.pool.publish_events is wants for p in sim.pods)


def test_pool_events_handed_over_directly_build_the_same_index_as_the_wire_form():
    from engine.sim.kvevents import event_to_wire
    from pickers.kvblocks.precise import PreciseIndex

    fleet = fleet_from_flags(2, "H100", "8b", num_blocks=300)  # small pools: evictions (BlockRemoved) too
    sim = ClusterSim(fleet, lambda eps, clock: make_router("precise", eps, clock))
    kv = sim.router.director.dl.kv_index
    captured: list = []
    apply = kv.apply_events
    kv.apply_events = lambda pod, evs, now=0.0: (captured.append((pod, list(evs), now)), apply(pod, evs, now=now))[1]
    reqs = [tr(i, 0.01 * i, 2048, 4, [i % 5, 100 + i, 200 + i, 300 + i]) for i in range(12)]
    sim.run(trace_prompts(shape_trace(reqs)))
    assert captured and type(captured[0][1][0]).__module__ == "engine.kvcache.events"  # records, no wire round trip
    assert any(type(e).__name__ == "BlockRemoved" for _, evs, _ in captured for e in evs)
    ep = sim.router.director.dl.endpoints
    via_wire = PreciseIndex(ep.slot, ep.address)
    for slot in ep.active_slots().tolist():
        via_wire.set_source(slot, True)
    for pod, evs, now in captured:
        via_wire.apply_events(pod, [event_to_wire(e) for e in evs], now=now)
    direct = kv.contents_by_address()
    assert direct and via_wire.contents_by_address() == direct


def test_scrapes_hand_the_picker_each_pods_kv_capacity():
    """A virtual-time scrape carries vllm:cache_config_info as a real one does (num_gpu_blocks, block_size):
    the picker's approximate index then holds at most a pod's real KV capacity of blocks per pod (learning
    from our own decisions cannot claim more than the pod can keep), not its 200,000-block fallback."""
    fleet = fleet_from_flags(2, "H100", "8b", num_blocks=64)
    reqs = [tr(i, 0.02 * i, 600, 2, [1000 + i, 2000 + i]) for i in range(12)]  # 37 new blocks each, 2 pods
    sim = ClusterSim(fleet, lambda eps, clock: make_router("default", eps, clock), scrape_interval=0.05)
    res = sim.run(trace_prompts(reqs))
    assert all(r.status == "ok" for r in res.records)
    dl = sim.router.director.dl
    slots = [dl.endpoints.slot(p.name) for p in res.pods]
    assert [int(dl.metrics.num_gpu_blocks[s]) for s in slots] == [64, 64]
    learned = [int(dl.approx.pod_counts[0, s]) for s in slots]
    assert all(0 < n <= 64 for n in learned), learned  # 6 prompts x 37 blocks were sent to each pod


def test_access_log_emulation_reports_a_first_token_only_with_the_end():
    """``access_log``: as behind Envoy in access-log mode, the picker hears of a request's first token only when
    it ends (with the real time), and meanwhile releases its prefill by prediction or its pod's KV event."""
    import numpy as np

    from engine.sim.cluster.routers import ClusterRequest, ManualClock, Usage, make_router
    from pickers.types import Endpoint

    clock = ManualClock(0.0)
    eps = [Endpoint(f"10.0.0.{i}:8000", model_profile="8b", accelerator="L40S") for i in (1, 2)]
    for access_log, late in ((False, False), (True, True)):
        router = make_router("default", eps, clock, access_log=access_log)
        director = router.director
        assert director.predicted_first_token is access_log
        req = ClusterRequest("r", 0.0, np.arange(1, 257), 8)
        pod, _ = router.route(req, 0.0)
        slot = director.dl.endpoints.slot(pod)
        router.on_first_token(req, 0.05)
        assert bool(director.dl.inflight.decoding[slot] == 0) is late  # not heard of yet
        router.on_finished(req, Usage(256, 8), 0.5)
        assert director.dl.inflight.requests[slot] == 0
        assert req.state == {}
