"""Where the real-time load curve stands: every point of every workload, from the dated set that holds its
adopted runs, judged by the issue's bar in one report.

    kvswitch bench standing e2e/bench/results/DATE-standing/manifest.json [--no-plots]

A real-time point costs this machine minutes to hours of wall time, so the curves were run a point or two at a
time (``kvswitch bench curves``), and when kvswitch's code changed, kvswitch alone was run again on an earlier
set's plan (``--plan-from``) and judged against that set's peers. No one set holds the curve. The manifest says,
per point, whose kvswitch runs count and whose peers' runs they are judged against; this module checks that the
two are the same runs (traces, rate, requests per run, time scale: ``rtcurve.runs_differ``), applies the bar
(``rtcurve.verdict``) and writes, beside the manifest, README.md (the verdict per point, the medians, the sets
and code they came from) and one 4-panel plot per workload against load / knee.

Manifest (JSON; set paths relative to the manifest's folder)::

    {"about": "how the points were chosen (Markdown, one paragraph)",
     "points": [{"workload": "no-sharing", "load": 2, "kvswitch": "../2026-12-06-slack-no-sharing-2x-600-ts4",
                 "peers": "../2026-12-06-curves-no-sharing-2x-600-ts4", "code": "3825fff"}, ...]}

``peers`` defaults to the ``kvswitch`` set (a set run with every router). A peers set's own kvswitch rows are
never used. A manifest that names a point twice, a set without ``curves.json``, a point a set did not run, or two
sets whose runs differ is refused with the reason (``ValueError``; exit status 2), and nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.bench import rtcurve

KVSWITCH = "kvswitch"
_POINT_KEYS = {"workload", "load", "kvswitch", "peers", "code"}


@dataclass(frozen=True, slots=True)
class Point:
    """One load point of one workload and the sets that hold its runs. Invariant: ``load`` > 0."""

    workload: str
    load: float  # offered load / the workload's knee, as the sets key it (two decimals)
    kvswitch: Path  # the set whose kvswitch runs count
    peers: Path  # the set whose other routers' runs they are judged against
    code: str  # the commit kvswitch ran, for the reader


@dataclass(frozen=True, slots=True)
class Standing:
    """A point's runs and the bar's verdict on them. Invariant: ``by_router`` holds kvswitch and >= 1 peer."""

    point: Point
    knee_req_s: float
    rate: float
    requests: int
    time_scale: float
    by_router: dict[str, dict[str, float]]  # router -> medians over repetitions (``rtcurve.medians``' figures)
    verdict: str  # "met", or what is missed (``rtcurve.verdict``)


def read_manifest(path: Path) -> tuple[str, list[Point]]:
    """The manifest's ``about`` text and its points, in its order."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list) or not doc["points"]:
        raise ValueError(f"{path}: needs a non-empty list under \"points\"")
    about = doc.get("about", "")
    if not isinstance(about, str):
        raise ValueError(f"{path}: \"about\" is text")
    here = Path(path).parent
    points: list[Point] = []
    seen: set[tuple[str, float]] = set()
    for i, entry in enumerate(doc["points"]):
        where = f"{path}: point {i + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: an object with {sorted(_POINT_KEYS)}")
        if unknown := set(entry) - _POINT_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        workload, load, kv = entry.get("workload"), entry.get("load"), entry.get("kvswitch")
        if not isinstance(workload, str) or not isinstance(kv, str):
            raise ValueError(f"{where}: \"workload\" and \"kvswitch\" are text")
        if isinstance(load, bool) or not isinstance(load, (int, float)) or not load > 0:
            raise ValueError(f"{where}: \"load\" is a number > 0 (the offered load over the knee)")
        peers = entry.get("peers", kv)
        code = entry.get("code", "")
        if not isinstance(peers, str) or not isinstance(code, str):
            raise ValueError(f"{where}: \"peers\" and \"code\" are text")
        key = (workload, round(float(load), 2))
        if key in seen:
            raise ValueError(f"{where}: {workload} at {load:g}x is named twice")
        seen.add(key)
        sets = (here / kv, here / peers)
        for s in sets:
            if not (s / "curves.json").is_file():
                raise ValueError(f"{where}: no curves.json in {s}")
        points.append(Point(workload, key[1], sets[0], sets[1], code))
    return about, points


def _plan_at(doc: dict[str, Any], where: Path, workload: str, load: float) -> dict[str, Any]:
    """The plan of ``workload`` in a set's curves.json, narrowed to the rate that is ``load`` x its knee."""
    plans = {p["workload"]: p for p in doc["meta"]["plans"]}
    if workload not in plans:
        raise ValueError(f"{where} has no {workload} runs")
    p = plans[workload]
    for rate, ts in zip(p["rates"], rtcurve.plan_scales(p), strict=True):
        if round(rate / p["knee_req_s"], 2) == load:
            return {"requests": p["requests"], "rates": [rate], "time_scales": [ts], "knee_req_s": p["knee_req_s"]}
    raise ValueError(f"{where} has no {workload} run at {load:g}x")


def assess(point: Point) -> Standing:
    """The point's medians per router (kvswitch from its set, every other router from the peers' set) and the
    bar's verdict. Raises ValueError where the two sets' runs are not the same, a side has no runs, or a set's
    curves.json or results lack what a curve set holds."""
    try:
        return _assess(point)
    except (KeyError, TypeError) as exc:
        sets = {point.kvswitch.name, point.peers.name}
        raise ValueError(f"{point.workload} at {point.load:g}x: {' or '.join(sorted(sets))} is not a curve set "
                         f"({type(exc).__name__}: {exc})") from exc


def _assess(point: Point) -> Standing:
    w, ld = point.workload, point.load
    mine_doc = json.loads((point.kvswitch / "curves.json").read_text())
    peers_doc = mine_doc if point.peers == point.kvswitch else json.loads((point.peers / "curves.json").read_text())
    mine_plan = _plan_at(mine_doc, point.kvswitch, w, ld)
    peers_plan = _plan_at(peers_doc, point.peers, w, ld)
    if why := rtcurve.runs_differ(peers_plan, mine_plan):
        raise ValueError(f"{w} at {ld:g}x: kvswitch's runs ({point.kvswitch.name}) are not the peers' "
                         f"({point.peers.name}): {why}")
    mine = rtcurve.medians(point.kvswitch, mine_doc)
    theirs = mine if peers_doc is mine_doc else rtcurve.medians(point.peers, peers_doc)
    if (w, ld, KVSWITCH) not in mine:
        raise ValueError(f"{point.kvswitch} has no kvswitch runs of {w} at {ld:g}x")
    peers = {r: m for (w2, l2, r), m in theirs.items() if (w2, l2) == (w, ld) and r != KVSWITCH}
    if not peers:
        raise ValueError(f"{point.peers} has no peers' runs of {w} at {ld:g}x")
    by_router = {KVSWITCH: mine[(w, ld, KVSWITCH)], **dict(sorted(peers.items(), key=lambda kv: _order(kv[0])))}
    verdict = rtcurve.point_verdict(by_router, w, ld)
    return Standing(point, mine_plan["knee_req_s"], mine_plan["rates"][0], mine_plan["requests"],
                    mine_plan["time_scales"][0], by_router, verdict)


def _order(router: str) -> tuple[int, str]:
    return (rtcurve.ROUTERS.index(router) if router in rtcurve.ROUTERS else len(rtcurve.ROUTERS), router)


def _set_link(path: Path, out: Path) -> str:
    rel = Path("..") / path.name if path.parent.resolve() == out.parent.resolve() else path
    return f"[{path.name}]({rel}/README.md)"


def render(standings: list[Standing], about: str, out: Path, plots: bool = True) -> Path:
    """README.md (and with ``plots`` a ``<workload>-curve.png`` per workload) in ``out``; the README's path."""
    met = sum(s.verdict == "met" for s in standings)
    lines = [f"# Where the load curve stands in real time ({_dt.date.today().isoformat()})", "",
             "Generated by `kvswitch bench standing manifest.json` from the sets the manifest names: kvswitch's "
             "runs from one set, the peers' from the set they are judged against (the same traces, rate, "
             "requests per run and time scale, checked). Every figure is the median over the point's "
             "repetitions, in simulated time. The bar (issue 15): kvswitch's req/s >= the best peer's, TTFT p90 "
             "<= the best peer's, TTFT p99 <= 1.1x the best peer's.", ""]
    if about:
        lines += [about, ""]
    lines += [f"**{met} of {len(standings)} points meet the bar.**", "",
              "| workload | load | verdict | requests per run | time scale | kvswitch's runs (code) | peers' runs |",
              "|---|---|---|---|---|---|---|"]
    for s in standings:
        p = s.point
        code = f" ({p.code})" if p.code else ""
        lines.append(f"| {p.workload} | {p.load:g}x | {s.verdict} | {s.requests} | {s.time_scale:g} | "
                     f"{_set_link(p.kvswitch, out)}{code} | "
                     f"{'the same set' if p.peers == p.kvswitch else _set_link(p.peers, out)} |")
    lines.append("")
    workloads = list(dict.fromkeys(s.point.workload for s in standings))
    for w in workloads:
        mine = sorted((s for s in standings if s.point.workload == w), key=lambda s: s.point.load)
        knee = mine[0].knee_req_s
        lines += [f"## {w} (knee {knee:.2f} req/s)", ""]
        if plots:
            lines += [f"![{w}]({w}-curve.png)", ""]
        lines += ["| load | requests per run | router | req/s | TTFT p90 ms | TTFT p99 ms | hit % | runs |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in mine:
            for r, m in s.by_router.items():
                name = f"**{r}**" if r == KVSWITCH else r
                lines.append(f"| {s.point.load:g}x | {s.requests} | {name} | {m['req_s']:.3f} | {m['p90']:.0f} | "
                             f"{m['p99']:.0f} | {100 * m['hit']:.0f} | {m['n']:.0f} |")
        lines.append("")
        if plots:
            _plot(out, w, knee, mine)
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _plot(out: Path, w: str, knee: float, standings: list[Standing]) -> None:
    med = {(w, s.point.load, r): m for s in standings for r, m in s.by_router.items()}
    routers = sorted({r for s in standings for r in s.by_router}, key=_order)
    lengths = "/".join(str(s.requests) for s in standings)
    rtcurve.plot_curve(out, w, knee, routers, med, note=f" ({lengths} requests per run by load)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvswitch bench standing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        about, points = read_manifest(a.manifest)
        standings = []
        for i, point in enumerate(points, 1):
            standings.append(assess(point))
            print(f"kvswitch bench standing: {i}/{len(points)} {point.workload} {point.load:g}x: "
                  f"{standings[-1].verdict}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"kvswitch bench standing: {exc}", file=sys.stderr)
        return 2
    path = render(standings, about, a.manifest.parent, plots=not a.no_plots)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
