"""``kvswitch bench standing``: the real-time curve assembled from the dated sets that hold each point's runs.

Judged on committed sets: kvswitch's rows come from the set the manifest names for them, never from the peers'
set (whose own kvswitch row is older code), the bar is the curve reports' own, and a manifest that would put
runs of other traces, lengths or time scales side by side is refused with the reason, writing nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e.bench import rtcurve, standing

RESULTS = rtcurve.RESULTS_DIR


def _manifest(tmp_path: Path, points: list[dict], about: str = "") -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"about": about, "points": points}))
    return path


def test_kvswitch_is_judged_from_its_own_set_against_the_peers_set(tmp_path):
    path = _manifest(tmp_path, [
        {"workload": "no-sharing", "load": 2, "kvswitch": str(RESULTS / "2026-12-06-slack-no-sharing-2x-600-ts4"),
         "peers": str(RESULTS / "2026-12-06-curves-no-sharing-2x-600-ts4"), "code": "3825fff"},
        {"workload": "no-sharing", "load": 0.5, "kvswitch": str(RESULTS / "2026-12-06-curves-no-sharing-0.5x-400-ts4")},
    ], about="Two points.")
    about, points = standing.read_manifest(path)
    assert about == "Two points."
    assert [(p.workload, p.load) for p in points] == [("no-sharing", 2.0), ("no-sharing", 0.5)]
    assert points[1].peers == points[1].kvswitch  # one set with every router
    two_x, half = (standing.assess(p) for p in points)

    # the re-run's kvswitch (9.984 req/s, p90 1,180 ms), not the peers' set's older one (which missed p90)
    older = rtcurve.medians(points[0].peers, json.loads((points[0].peers / "curves.json").read_text()))
    assert older[("no-sharing", 2.0, "kvswitch")]["p90"] > older[("no-sharing", 2.0, "vllm-router:kv_aware")]["p90"]
    assert two_x.by_router["kvswitch"]["req_s"] == pytest.approx(9.984, abs=5e-4)
    assert two_x.by_router["kvswitch"]["p90"] == pytest.approx(1180, abs=0.5)
    assert list(two_x.by_router) == rtcurve.ROUTERS  # kvswitch first, the peers in the reports' order
    assert two_x.verdict == "met" and (two_x.requests, two_x.time_scale) == (600, 4.0)
    assert half.verdict == "req/s 4.745 < 4.770; p90 359 > 353 ms"

    readme = standing.render([two_x, half], about, tmp_path, plots=True).read_text()
    assert "**1 of 2 points meet the bar.**" in readme
    assert "| no-sharing | 2x | met | 600 | 4 | [2026-12-06-slack-no-sharing-2x-600-ts4]" in readme
    assert "(3825fff) | [2026-12-06-curves-no-sharing-2x-600-ts4]" in readme
    assert "| no-sharing | 0.5x | req/s 4.745 < 4.770; p90 359 > 353 ms | 400 | 4 | " in readme
    assert "2026-12-06-curves-no-sharing-0.5x-400-ts4/README.md) | the same set |" in readme
    assert "| 0.5x | 400 | **kvswitch** | 4.745 | 359 | 811 | 0 | 3 |" in readme
    assert (tmp_path / "no-sharing-curve.png").stat().st_size > 10_000


def test_runs_of_another_length_are_not_set_beside_each_other(tmp_path):
    """kvswitch's 600-request runs against the peers' 1,000-request runs would compare other traces."""
    path = _manifest(tmp_path, [{"workload": "no-sharing", "load": 1,
                                 "kvswitch": str(RESULTS / "2026-12-06-curves-no-sharing-1x-600-ts4"),
                                 "peers": str(RESULTS / "2026-12-06-curves-no-sharing-1x-1000-ts4")}])
    _, points = standing.read_manifest(path)
    with pytest.raises(ValueError, match="1000 requests per run there, 600 here"):
        standing.assess(points[0])


@pytest.mark.parametrize(("manifest", "why"), [
    ("{not json", "not JSON"),
    ('{"points": []}', "non-empty list"),
    ('{"points": [{"workload": "no-sharing", "load": 0, "kvswitch": "x"}]}', "number > 0"),
    ('{"points": [{"workload": "no-sharing", "load": "1", "kvswitch": "x"}]}', "number > 0"),
    ('{"points": [{"workload": "no-sharing", "load": 1, "kvswitch": "x", "extra": 1}]}', "unknown keys"),
    ('{"points": [{"workload": "no-sharing", "load": 1, "kvswitch": "nowhere"}]}', "no curves.json in"),
    ('{"points": [{"workload": "no-sharing", "load": 1, "kvswitch": "SET"}, '
     '{"workload": "no-sharing", "load": 1.0, "kvswitch": "SET"}]}', "named twice"),
])
def test_a_bad_manifest_is_refused_with_the_reason_and_writes_nothing(tmp_path, capsys, manifest, why):
    path = tmp_path / "manifest.json"
    path.write_text(manifest.replace("SET", str(RESULTS / "2026-12-06-curves-no-sharing-1x-1000-ts4")))
    with pytest.raises(ValueError, match=why):
        standing.read_manifest(path)
    assert standing.main([str(path), "--no-plots"]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()


def test_a_point_the_set_did_not_run_is_refused(tmp_path, capsys):
    path = _manifest(tmp_path, [{"workload": "no-sharing", "load": 3,
                                 "kvswitch": str(RESULTS / "2026-12-06-curves-no-sharing-1x-1000-ts4")},
                                {"workload": "mooncake", "load": 1,
                                 "kvswitch": str(RESULTS / "2026-12-06-curves-no-sharing-1x-1000-ts4")}])
    assert standing.main([str(path), "--no-plots"]) == 2
    assert "has no no-sharing run at 3x" in capsys.readouterr().err
    _, points = standing.read_manifest(path)
    with pytest.raises(ValueError, match="has no mooncake runs"):
        standing.assess(points[1])
    assert not (tmp_path / "README.md").exists()


def test_kvswitch_bench_standing_writes_the_report_beside_the_manifest(tmp_path, capsys):
    from e2e.bench import cli

    path = _manifest(tmp_path, [{"workload": "mooncake", "load": 3,
                                 "kvswitch": str(RESULTS / "2026-12-06-slack-mooncake-3x-400-ts2"),
                                 "peers": str(RESULTS / "2026-12-06-curves-mooncake-3x-400-ts2")}])
    assert cli.main(["standing", str(path), "--no-plots"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"report: {tmp_path / 'README.md'}"
    assert "1/1 mooncake 3x: met" in out.err  # progress, a line per point
    assert "**1 of 1 points meet the bar.**" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_a_folder_whose_curves_json_is_not_a_curve_sets_is_refused(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "curves.json").write_text('{"meta": {"plans": [{"workload": "no-sharing"}]}}')
    path = _manifest(tmp_path, [{"workload": "no-sharing", "load": 1, "kvswitch": "broken"}])
    assert standing.main([str(path), "--no-plots"]) == 2
    assert "no-sharing at 1x: broken is not a curve set (KeyError: 'rates')" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
