"""Replay speed work must not change results: quiet decode runs against step-by-step, seeds, progress."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from engine.sim.cluster import ClusterSim, TraceRequest, fleet_from_flags, make_router, summarize, trace_prompts
from engine.sim.cluster.oracle import OracleRouter
from engine.sim.cluster.progress import ReplayProgress


def _trace(n: int = 120, seed: int = 3) -> list[TraceRequest]:
    """Shared prefixes, mixed lengths, bursts: prefill chunks, decode batches, block growth, cache hits."""
    import random

    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(8.0)
        group = rng.randrange(4)
        n_in = rng.choice([300, 900, 2500, 9000])
        ids = [group * 100 + k for k in range(3)] + [10_000 + i * 40 + k for k in range(-(-n_in // 512))]
        out.append(TraceRequest(i, t, n_in, rng.choice([1, 2, 17, 40, 200]), ids))
    return out


def _replay(policy: str, quiet: bool, pods: int = 3, pd: str | None = None, seed: int = 0, fast: bool = True):
    """``fast=False``: every other fast path off too (stats of every pod every scrape, vLLM-shaped events)."""
    fleet = fleet_from_flags(pods, "H100", "8b", pd=pd, num_blocks=600)
    router = OracleRouter() if policy == "oracle" else (lambda eps, clock: make_router(policy, eps, clock, seed=seed))
    sim = ClusterSim(fleet, router, quiet_runs=quiet, seed=seed, incremental_scrapes=fast, compact_events=fast)
    res = sim.run(trace_prompts(_trace()))
    recs = [(r.request_id, r.first_token, r.finish, r.cached_tokens, r.decode_pod, r.prefill_pod, r.status)
            for r in res.records]
    pods_state = [(p.steps, p.busy_time, p.core.generation_tokens, p.core.num_preemptions, p.core.pool.num_free,
                   p.core.pool.num_cached) for p in res.pods]
    return recs, pods_state, res


@pytest.mark.parametrize("policy,pd", [("round-robin", None), ("default", None), ("round-robin", "1:2"),
                                       ("least-inflight", None)])
def test_quiet_runs_give_exactly_the_step_by_step_result(policy, pd):
    quiet = _replay(policy, True, pd=pd)
    steps = _replay(policy, False, pd=pd)
    assert quiet[0] == steps[0]  # every request: same times, pod, cache hits
    assert quiet[1] == steps[1]  # every pod: same steps, busy time, tokens, preemptions, pool state
    assert quiet[2].events < steps[2].events  # and the point of it: fewer events
    if policy == "round-robin" and pd is None:  # the pool ran short: runs stop before a preemption
        assert sum(p.core.num_preemptions for p in quiet[2].pods) > 0


@pytest.mark.parametrize("policy,pd", [("default", None), ("precise", None), ("load-only", None),
                                       ("default", "1:2")])
def test_fast_paths_give_exactly_the_reference_result(policy, pd):
    """Quiet runs, scrapes that send only pods whose load moved, and KV events in compact in-process shapes
    (batched evictions, token ids as arrays) against one event per step, every pod's stats every scrape and
    vLLM's wire shapes: the same decisions, times, cache hits and pool states."""
    fast = _replay(policy, True, pd=pd)
    ref = _replay(policy, False, pd=pd, fast=False)
    assert fast[0] == ref[0]
    assert fast[1] == ref[1]
    assert fast[2].events < ref[2].events


@pytest.mark.parametrize("policy", ["round-robin", "default"])
def test_same_seed_same_table(policy):
    a = summarize(_replay(policy, True)[2])
    b = summarize(_replay(policy, True)[2])
    assert a == b


def test_picker_tie_breaks_follow_the_seed():
    """max-score breaks ties at random: seeded from the replay's seed, so seeds differ but each repeats."""
    runs = {s: [r[4] for r in _replay("load-only", True, pods=4, seed=s)[0]] for s in (1, 2)}
    assert runs[1] == [r[4] for r in _replay("load-only", True, pods=4, seed=1)[0]]
    assert runs[1] != runs[2]


def test_progress_lines_on_a_pipe_and_one_updating_line_on_a_tty():
    pipe = io.StringIO()
    bar = ReplayProgress("rr", 100, 50.0, stream=pipe, every_s=0.0)
    bar(10.0, 30, 20)
    bar(50.0, 100, 100)
    bar.close()
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 2 and "sim 10/50 s" in lines[0] and "20/100 requests" in lines[0]
    assert "ETA 0s" in lines[1]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = ReplayProgress("rr", 100, 50.0, stream=tty, every_s=0.0)
    bar(10.0, 30, 20)
    bar(20.0, 60, 50)
    bar.close()
    out = tty.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1


@pytest.mark.parametrize("engine", [{"dp": 2}, {"speculative": True}])
def test_quiet_runs_stand_down_for_data_parallel_pods_and_speculation(engine):
    """A DP pod steps its ranks in lockstep and a speculative step emits several tokens: neither is a quiet
    step, so those pods step one by one with quiet runs on (same result, same number of events)."""

    def run(quiet: bool):
        fleet = fleet_from_flags(2, "H200", "moe", **engine)
        sim = ClusterSim(fleet, lambda eps, clock: make_router("round-robin", eps, clock), quiet_runs=quiet)
        res = sim.run(trace_prompts(_trace(60)))
        return [(r.request_id, r.first_token, r.finish, r.decode_pod, r.decode_rank, r.status)
                for r in res.records], [(p.steps, p.busy_time, list(p.group.busy_time)) for p in res.pods], res

    on, off = run(True), run(False)
    assert on[0] == off[0] and on[1] == off[1]
    assert on[2].events == off[2].events
    assert all(r[5] == "ok" for r in on[0])


@pytest.mark.parametrize("policy", ["vllm:kv_aware", "oracle"])
def test_quiet_runs_are_settled_for_routers_that_read_the_pods(policy):
    """Routers that read the pods themselves when they route (a peer emulation; the oracle, which takes no
    KV events, so its pods' quiet runs grow and commit blocks) route as step by step. What they read today
    (prompt-prefix hits, queue lengths) no quiet step changes; ClusterSim also settles runs before they route."""
    quiet = _replay(policy, True)
    steps = _replay(policy, False)
    assert quiet[0] == steps[0] and quiet[1] == steps[1]
    assert quiet[2].events < steps[2].events


def test_same_seed_same_table_in_another_process(tmp_path):
    """The replay's result depends on nothing a process draws for itself (string hash seed, set order, ids):
    two ``sim replay`` processes under different PYTHONHASHSEED give the same summary and the same record of
    every request for the default profile."""
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": int(r.arrival * 1000), "input_length": r.input_length,
                    "output_length": r.output_length, "hash_ids": r.hash_ids}) + "\n" for r in _trace(60)))
    out = []
    for hash_seed in ("1", "2"):
        js, reqs = tmp_path / f"s{hash_seed}.json", tmp_path / f"r{hash_seed}.jsonl"
        subprocess.run([sys.executable, "-c", "import sys; from engine.sim.cluster.cli import main; "
                        "sys.exit(main(sys.argv[1:]))", str(trace), "--pods", "3", "--policies", "default",
                        "--seed", "0", "--quiet", "--json", str(js), "--requests-out", str(reqs)],
                       check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, timeout=300)
        out.append((re.sub(r'"wall_s": [0-9.e+-]+', "", js.read_text()), reqs.read_text()))
    assert out[0] == out[1]
    assert out[0][1].count("\n") == 60 and '"completed"' in out[0][0]
