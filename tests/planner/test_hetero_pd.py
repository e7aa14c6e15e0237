"""Cross-kind prefill/decode fleets in the offline search (``kvswitch plan``): the P/D capacities, a case where
prefill on one kind and decode on another must win, one where it must not, the replay of such a fleet, and
bad input. Known answers from the cost model's published profiles (engine/costmodel/profiles.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pickers.planner import LoadShape, PodKind, parse_accelerators, pod_capacity
from pickers.planner.capacity import decode_capacity, decode_tpot, prefill_capacity
from pickers.planner.catalogue import Catalogue
from pickers.planner.search import Candidate, Pool, search


def test_decode_pod_capacity_meets_tpot_and_stops_at_max_num_seqs():
    shape = LoadShape.from_lengths([200] * 10, [100] * 10)
    kind = PodKind("MI300X", "8b", 1)
    cap = decode_capacity(kind, shape, 0.05)
    assert cap > 0 and decode_tpot(kind, shape, cap) <= 0.05 + 1e-9
    # MI300X holds ~1.2 M tokens of KV: 300-token contexts are bounded by the engine's 256 sequences, not KV
    assert decode_capacity(kind, shape, 0.05, max_num_seqs=64) < cap
    assert decode_capacity(PodKind("L40S", "8b", 1), shape, 0.02) == 0.0  # its weights alone take > 20 ms


def test_prefill_pod_capacity_pays_for_the_kv_pull_and_the_first_decode_step():
    shape = LoadShape.from_lengths([8000] * 10, [100] * 10)
    h100 = PodKind("H100", "8b", 1)
    alone = prefill_capacity(h100, shape, 1.0, 0.95)
    slow_link = prefill_capacity(h100, shape, 1.0, 0.95, link="tcp-100g")
    first_step = prefill_capacity(h100, shape, 1.0, 0.95, first_step_s=0.1)
    assert alone > slow_link > 0 and alone > first_step > 0
    # a decode pod of four GPUs pulls over four NICs: less of the TTFT goes to the transfer
    assert prefill_capacity(h100, shape, 1.0, 0.95, decode=PodKind("H100", "8b", 4), link="tcp-100g") > slow_link
    assert prefill_capacity(PodKind("L40S", "8b", 1), shape, 0.5, 0.95) == 0.0  # 8 K tokens take > 0.5 s


def _long_decode_heavy() -> tuple[list[int], list[int]]:
    return [16000] * 50, [8000] * 50


def test_cross_kind_pd_wins_where_one_kind_cannot_prefill_in_time_and_the_other_decodes_cheaply():
    # 16 K-token prompts within 0.35 s: MI300X cannot prefill them at any TP (TP 4 alone takes ~0.38 s: its
    # 64 GB/s scale-up link makes the all-reduces dear), so an MI300X-only fleet is infeasible; H100 TP 4 can
    # (~0.22 s). Outputs are long (8 K tokens): decode is most of the work. With MI300X priced low (a
    # hand-built price, not the catalogue's) the cheapest fleet prefills on H100 and decodes on MI300X.
    inputs, outputs = _long_decode_heavy()
    shape = LoadShape.from_lengths(inputs, outputs)
    for tp in (1, 2, 4):
        assert pod_capacity(PodKind("MI300X", "8b", tp), shape, 0.35, 0.06, 0.95) == 0.0
        assert prefill_capacity(PodKind("MI300X", "8b", tp), shape, 0.35, 0.95) == 0.0
    cands = search(inputs, outputs, 8.0, parse_accelerators("H100=2.49,MI300X=0.2"), "8b", 0.35, 0.06, 0.95)
    best = cands[0]
    assert best.mixed and best.disaggregated
    assert [(p.role, p.kind.accelerator) for p in best.pools] == [("prefill", "H100"), ("decode", "MI300X")]
    single = min(c.cost_per_hour for c in cands if not c.mixed)
    assert best.cost_per_hour < 0.9 * single
    # without P/D candidates no two-kind fleet exists at all here (one prompt length: no split)
    assert not [c for c in search(inputs, outputs, 8.0, parse_accelerators("H100=2.49,MI300X=0.2"), "8b", 0.35,
                                  0.06, 0.95, pd=False) if c.mixed]


def test_cross_kind_pd_does_not_win_where_one_kind_is_cheaper_for_both_phases():
    # chat-length prompts: MI300X TP 1 prefills faster than H100 TP 1 (1307 against 989 TFLOP/s) and has more
    # bandwidth (5.3 against 3.35 TB/s) at a lower price: it is the cheapest kind for prefill and for decode,
    # so no fleet with an H100 pool in it can beat the best MI300X-only fleet
    inputs, outputs = [1500] * 40 + [3000] * 10, [250] * 50
    cands = search(inputs, outputs, 8.0, parse_accelerators("H100=2.49,MI300X=2.19"), "8b", 1.0, 0.06, 0.95,
                   tps=(1,))
    assert cands[0].kinds == ("MI300X",)
    cross = [c for c in cands if c.mixed and c.disaggregated]
    assert cross and min(c.cost_per_hour for c in cross) > cands[0].cost_per_hour
    shape = LoadShape.from_lengths(inputs, outputs)
    h, m = PodKind("H100", "8b", 1), PodKind("MI300X", "8b", 1)
    assert prefill_capacity(m, shape, 1.0, 0.95) / 2.19 > prefill_capacity(h, shape, 1.0, 0.95) / 2.49
    assert decode_capacity(m, shape, 0.06) / 2.19 > decode_capacity(h, shape, 0.06) / 2.49


def test_pd_candidates_describe_roles_and_write_a_fleet_the_simulator_replays(tmp_path):
    from engine.sim.cluster.fleet import load_fleet
    from engine.sim.cluster.plan import confirm, fleet_yaml
    from engine.sim.cluster.report import SloTargets
    from engine.sim.cluster.trace import TraceRequest

    c = Candidate((Pool(PodKind("H100", "8b", 1), 1, role="prefill"), Pool(PodKind("MI300X", "8b", 1), 2,
                                                                          role="decode")), 2.49 + 2 * 2.19)
    assert c.mixed and c.disaggregated and c.describe() == "1x H100 tp1 prefill + 2x MI300X tp1 decode"
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet_yaml(c, "8b"))
    fleet = load_fleet(path)
    assert sorted((p.role, p.accelerator) for p in fleet.pods) == [
        ("decode", "MI300X"), ("decode", "MI300X"), ("prefill", "H100")]
    reqs = [TraceRequest(i, i * 0.2, 2000, 20, []) for i in range(20)]
    s = confirm(c, reqs, "8b", SloTargets(2.0, 0.1), {"H100": 2.49, "MI300X": 2.19}, progress=False)
    assert s["completed"] == 20 and s["slo_attainment"] == 1.0
    # the TTFT holds the H100 prefill and the KV pull the MI300X decode pod charges
    h100, mi = PodKind("H100", "8b", 1).cost(), PodKind("MI300X", "8b", 1).cost()
    assert s["ttft_p99_s"] >= h100.prefill_time(2000) + mi.transfer_time(2000) - 1e-9


def test_length_split_router_takes_the_least_busy_prefill_pod_until_the_first_token():
    from engine.sim.cluster.routers import ClusterRequest, Endpoint, LengthSplitRouter, Role

    eps = [Endpoint(address="10.0.0.0:8000", role=Role.PREFILL, accelerator="H100"),
           Endpoint(address="10.0.0.1:8000", role=Role.PREFILL, accelerator="H100"),
           Endpoint(address="10.1.0.0:8000", role=Role.DECODE, accelerator="MI300X")]
    r = LengthSplitRouter(eps)
    a, b = ClusterRequest("a", 0.0, np.arange(50), 5), ClusterRequest("b", 0.0, np.arange(50), 5)
    da, pa = r.route(a, 0.0)
    db, pb = r.route(b, 0.0)
    assert da == db == "10.1.0.0:8000" and {pa, pb} == {"10.0.0.0:8000", "10.0.0.1:8000"}
    r.on_first_token(a, 0.1)  # a's prefill pod is free again: the next request goes there
    assert r.route(ClusterRequest("c", 0.0, np.arange(50), 5), 0.2)[1] == pa


@pytest.mark.parametrize("kwargs,why", [
    (dict(outputs=[100]), "output lengths"), (dict(goal=1.5), "goal"), (dict(ttft_s=0.0), "targets"),
    (dict(peak_rate=0.0), "positive peak rate"), (dict(utilization=0.0), "utilization"),
])
def test_search_rejects_bad_input(kwargs, why):
    args = dict(inputs=[1000] * 4, outputs=[100] * 4, peak_rate=1.0, catalogue=parse_accelerators("H100"),
                model="8b", ttft_s=1.0, tpot_s=0.05, goal=0.9)
    with pytest.raises(ValueError, match=why):
        search(**{**args, **kwargs})


@pytest.mark.parametrize("prices,why", [
    ({"H100": 0.0}, "positive"), ({"H100": float("nan")}, "positive"), ({"TPU9": 1.0}, "unknown kind"),
    ({}, "at least one kind"),
])
def test_a_catalogue_built_by_hand_is_checked_like_the_flag(prices, why):
    with pytest.raises(ValueError, match=why):
        Catalogue(prices, {k: 60.0 for k in prices})


def test_plan_json_marks_pd_rows(tmp_path, capsys):
    from engine.sim.cluster.plan import main as plan_main

    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 250, "input_length": 800 if i % 3 else 6000,
                                           "output_length": 20, "hash_ids": []}) for i in range(40)) + "\n")
    js = tmp_path / "plan.json"
    assert plan_main([str(trace), "--accelerators", "H100=2.49,MI300X=2.19", "--slo-ttft-ms", "3000",
                      "--slo-tpot-ms", "100", "--attainment", "0.9", "--confirm", "1", "--json", str(js),
                      "--quiet"]) == 0
    plan = json.loads(js.read_text())
    rows = plan["candidates"]
    assert {(r["mixed"], r["pd"]) for r in rows} >= {(False, False), (False, True), (True, True)}
    # the best one-kind fleet is looked for in each kind, not only in the kind the model ranks first
    assert {"H100, aggregated", "MI300X, aggregated", "H100, P/D", "MI300X, P/D"} <= set(plan["best_by_family"])
    assert {r["family"] for r in rows} == set(plan["best_by_family"])
    for r in rows:
        assert ("role: prefill" in r["yaml"]) == r["pd"] and ("prefill" in r["fleet"]) == r["pd"]
    capsys.readouterr()


def test_shrinking_tries_one_pod_fewer_in_every_pool_the_dearest_first():
    from engine.sim.cluster.plan import _shrinks

    cat = parse_accelerators("H100=2.49,MI300X=2.19")
    c = Candidate((Pool(PodKind("H100", "8b", 2), 2, role="prefill"), Pool(PodKind("MI300X", "8b", 1), 3,
                                                                          role="decode")), 0.0)
    out = _shrinks(c, cat)
    # the H100 pool ($9.96/h) before the MI300X pool ($6.57/h)
    assert [[p.count for p in s.pools] for s in out] == [[1, 3], [2, 2]]
    assert [s.cost_per_hour for s in out] == pytest.approx([2 * 2.49 + 3 * 2.19, 2 * 2 * 2.49 + 2 * 2.19])
    assert all(s.pools[0].role == "prefill" for s in out)
    assert _shrinks(Candidate((Pool(PodKind("H100", "8b", 1), 1),), 2.49), cat) == []
