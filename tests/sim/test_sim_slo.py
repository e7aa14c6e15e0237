"""Admission arms in virtual time: the summary keys, exact on hand-built records, and ``sim replay --admission``."""

from __future__ import annotations

import json

import pytest

from engine.sim.cluster.cli import main as replay_main
from engine.sim.cluster.fleet import PodSpec
from engine.sim.cluster.report import SloTargets
from engine.sim.cluster.simulator import Pod, RequestRecord, SimResult
from engine.sim.cluster.slo import admission_summary


def rec(i: int, arrival: float, first: float, finish: float, out: int, status: str = "ok", prompt: int = 1000,
        cached: int = 0, pod: str = "p", prefill_done: float = -1.0) -> RequestRecord:
    r = RequestRecord(f"req-{i}", i, arrival, prompt, out)
    r.first_token, r.finish, r.output_tokens, r.status = first, finish, out, status
    r.prompt_tokens, r.cached_tokens, r.decode_pod, r.prefill_done = prompt, cached, pod, prefill_done
    return r


class _Core:
    num_preemptions = 0


class _Group:  # a pod's DP group of one engine core
    cores = [_Core()]


def result(records: list[RequestRecord]) -> SimResult:
    pod = Pod.__new__(Pod)
    pod.spec, pod.name, pod.group = PodSpec("p", accelerator="A100"), "p", _Group()
    return SimResult(records, [pod], 100.0, 0)


def test_admission_keys_are_exact_on_hand_built_records():
    t = SloTargets(1.0, 0.1)
    recs = [
        rec(0, 0.0, 0.5, 1.4, 10),                      # met (TPOT 0.1)
        rec(1, 0.0, 1.5, 2.0, 2, prompt=2000),          # TTFT missed: its 2000 computed tokens are wasted
        rec(2, 61.0, 61.2, 64.0, 11, cached=500),       # TPOT 0.28 missed: 500 wasted
        rec(3, 62.0, -1.0, -1.0, 0, status="rejected"),  # rejected at arrival: computed nothing
        rec(4, 70.0, 70.1, 70.2, 1),                    # one token: no TPOT to miss
    ]
    got = admission_summary(result(recs), t, {"req-0": (0.55, 0.1), "req-4": (0.1, 0.05)})
    assert got["admitted_attainment"] == pytest.approx(2 / 4)
    assert got["rejected_frac"] == pytest.approx(1 / 5)
    assert got["wasted_prefill_frac"] == pytest.approx((2000 + 500) / (1000 + 2000 + 500 + 1000))
    per_min = [(0.1 + 0.5) / 2, 0.28]  # minute 0: req 0 and 1; minute 1: req 2 (req 4 has no TPOT)
    mean = sum(per_min) / 2
    std = (sum((x - mean) ** 2 for x in per_min) / 2) ** 0.5
    assert got["decode_tpot_cv_per_min"] == pytest.approx(std / mean)
    mape = got["prediction_mape"]["A100"]
    assert mape["ttft"] == pytest.approx((0.05 / 0.5 + 0.0) / 2) and mape["n_ttft"] == 2.0
    assert mape["tpot"] == pytest.approx(0.0) and mape["n_tpot"] == 1.0


def test_replay_runs_one_column_per_admission_arm(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    # a burst of long prompts: a tight TTFT target cannot be met for the later ones
    trace.write_text("\n".join(json.dumps({"timestamp": i * 20, "input_length": 6000 + 16 * i,
                                           "output_length": 20, "hash_ids": [1000 + i]}) for i in range(24)) + "\n")
    out = tmp_path / "o.json"
    cfg = tmp_path / "picker.yaml"
    cfg.write_text("scheduler: {handler: {type: prefill-decode, decider: threshold, skip_when_saturated: false}}\n")
    rc = replay_main([str(trace), "--pd", "1:1", "--policy", "default", "--picker-config", str(cfg),
                      "--slo-ttft-ms", "600", "--slo-tpot-ms", "50",
                      "--admission", "none,early,predictive", "--json", str(out), "--quiet"])
    assert rc == 0
    runs = {r["admission"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"none", "early", "predictive"}
    assert runs["none"]["rejected_frac"] == 0.0 and runs["none"]["completed"] == 24
    for arm in ("early", "predictive"):
        r = runs[arm]
        assert 0 < r["rejected_frac"] < 1 and r["admitted_attainment"] > runs["none"]["admitted_attainment"]
        assert r["wasted_prefill_frac"] < runs["none"]["wasted_prefill_frac"]
        assert set(r["prediction_mape"]) == {"H100"}
    table = capsys.readouterr().out
    assert "admitted attainment" in table and "predictive" in table
    assert replay_main([str(trace), "--pd", "1:1", "--policy", "default", "--admission", "early"]) == 2  # no targets
    assert replay_main([str(trace), "--pods", "1", "--slo-ttft-ms", "600", "--slo-tpot-ms", "50",
                        "--admission", "early"]) == 2  # round-robin cannot run an admission rule
    assert "needs a picker policy" in capsys.readouterr().err
