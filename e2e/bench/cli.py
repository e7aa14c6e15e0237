"""``kvswitch bench``: kvswitch side by side with its peers on one simulated fleet.

    kvswitch bench compare --preset reduced                     (what `make bench` runs)
    kvswitch bench compare --workload shared-prefix --routers kvswitch,envoy-rr,vllm-router:cache_aware \
        --rates 2,4,8 --pods 4 --time-scale 1 --repetitions 3 --seed 0 [--param groups=8 ...] [--out DIR]
    kvswitch bench curve ...                                    (load curves in virtual time)
    kvswitch bench curves [--budget-min 120] [--smoke|--plan]   (the real-time curves: make bench-curves)
    kvswitch bench standing DIR/manifest.json                   (the real-time curve from its dated sets)
    kvswitch bench report DIR/results.json                      (re-render the report)
    kvswitch bench workload --workload multi-turn --rate 2 --out trace.jsonl   (write a trace only)
    kvswitch bench peers                                        (is the peers' environment there?)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from e2e.bench.workloads import GENERATORS


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    return text


def parse_params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected key=value")
        out[key.replace("-", "_")] = _value(val)
    return out


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be positive")
    return vals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvswitch bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="run routers side by side and write a dated report")
    c.add_argument("--preset", help="reduced (make bench) or tiny; other flags override it")
    c.add_argument("--workload", choices=sorted(GENERATORS))
    c.add_argument("--routers", help="comma-separated: kvswitch[:profile], envoy-rr, vllm-router:<policy>, "
                                     "sglang-router:<policy>")
    c.add_argument("--rates", type=_floats, help="offered loads in requests/s, comma-separated")
    c.add_argument("--pods", type=int)
    c.add_argument("--pd", metavar="P:D", help="P/D fleet: P prefill pods then D decode pods (overrides --pods)")
    c.add_argument("--time-scale", type=float, help="wall seconds per simulated second (0.1: 10x faster)")
    c.add_argument("--repetitions", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--requests", type=int, help="requests per run (workload num_requests)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter (e.g. groups=8, prefix_tokens=6144, speedup=2)")
    c.add_argument("--model-profile")
    c.add_argument("--accelerator")
    c.add_argument("--out", type=Path, help="results folder (default e2e/bench/results/<date>-<workload>)")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--curve", action="store_true",
                   help="a load curve: offered loads = --loads x the knee, found by a virtual-time probe of the "
                        "same workload on the same fleet (round robin offered it 20x faster)")
    c.add_argument("--loads", type=_floats, default=[0.5, 1.0, 2.0, 3.0],
                   help="with --curve: multiples of the knee (default 0.5,1,2,3)")
    v = sub.add_parser("curve", help="load curves in virtual time (every router, 0.5x-3x the knee)",
                       add_help=False)
    v.add_argument("rest", nargs=argparse.REMAINDER)
    rc = sub.add_parser("curves", help="the real-time load curves: every workload, router, load and repetition "
                                       "within a wall-clock budget (make bench-curves)", add_help=False)
    rc.add_argument("rest", nargs=argparse.REMAINDER)
    st = sub.add_parser("standing", help="where the real-time curve stands: each point from the dated set that "
                                         "holds its runs, judged by the bar (e2e/bench/standing.py)", add_help=False)
    st.add_argument("rest", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="re-render README.md and plots from a results.json")
    r.add_argument("results", type=Path)
    r.add_argument("--no-plots", action="store_true")
    w = sub.add_parser("workload", help="write a workload's Mooncake-format trace")
    w.add_argument("--workload", choices=sorted(GENERATORS), required=True)
    w.add_argument("--rate", type=float)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--requests", type=int)
    w.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    w.add_argument("--out", type=Path, required=True)
    sub.add_parser("peers", help="check the peers' environment and print versions")
    return p


def _compare(a: argparse.Namespace) -> int:
    from e2e.bench.runner import PRESETS, CompareConfig, Comparison, config_from_preset

    params = parse_params(a.param)
    if a.requests is not None:
        params["num_requests"] = a.requests
    roles = None
    pods = a.pods
    if a.pd:
        try:
            n_p, n_d = (int(x) for x in a.pd.split(":"))
        except ValueError:
            print(f"kvswitch bench: --pd {a.pd!r}: expected P:D, e.g. 1:2", file=sys.stderr)
            return 2
        roles, pods = ["prefill"] * n_p + ["decode"] * n_d, n_p + n_d
    overrides = dict(workload=a.workload, routers=a.routers.split(",") if a.routers else None, rates=a.rates,
                     pods=pods, time_scale=a.time_scale, repetitions=a.repetitions, seed=a.seed, out=a.out,
                     roles=roles, model_profile=a.model_profile, accelerator=a.accelerator)
    if a.preset:
        cfg = config_from_preset(a.preset, **overrides)
        if a.workload and a.workload != PRESETS[a.preset]["workload"]:
            cfg.workload_params = {}
        cfg.workload_params = {**cfg.workload_params, **params}
    else:
        cfg = CompareConfig(**{k: v for k, v in overrides.items() if v is not None}, workload_params=params)
    if cfg.time_scale <= 0 or cfg.pods < 1 or cfg.repetitions < 1:
        print("kvswitch bench: --time-scale must be > 0, --pods and --repetitions >= 1", file=sys.stderr)
        return 2
    from e2e.bench import peersenv

    needs_peers = True  # aiperf is the client of every run
    if needs_peers and (why := peersenv.missing()):
        print(f"kvswitch bench: {why}", file=sys.stderr)
        return 2
    if a.curve:
        from e2e.bench import vcurve
        from e2e.bench.runner import probe_knee

        if cfg.workload in vcurve.WORKLOADS and not set(params) - {"num_requests"}:
            # the virtual-time curve's trace and knee (same generator, parameters, seeds, windows): the
            # generator's own rate would be conversations/s for multi-turn, and Mooncake's window per seed
            cfg.curve_requests = a.requests or 240
            knee = vcurve.knee(cfg.workload, 240, vcurve.CurveFleet(cfg.pods, cfg.accelerator, cfg.model_profile))
        else:
            knee = probe_knee(cfg)
        cfg.rates = [round(x * knee, 3) for x in a.loads]
        print(f"kvswitch bench: knee {knee:.2f} req/s (virtual-time probe: round robin offered the trace 20x "
              f"faster on {cfg.pods} x {cfg.model_profile}/{cfg.accelerator}); rates {cfg.rates}", flush=True)
    from e2e.bench.procs import interrupt_on_sigterm

    interrupt_on_sigterm()
    try:
        comparison = Comparison(cfg)
        if a.curve:
            comparison.knee = knee
        print(f"kvswitch bench: {len(comparison.plan())} runs -> {comparison.out}", flush=True)
        results = comparison.run()
    except (ValueError, TypeError) as exc:
        print(f"kvswitch bench: {exc}", file=sys.stderr)
        return 2
    _print_report(results, with_plots=not a.no_plots)
    return 0 if comparison.results and not comparison.failures else 1


def _print_report(results: Path, with_plots: bool) -> None:
    """Write the report beside results.json and print its table, so a terminal run ends with the numbers."""
    from e2e.bench.report import load, render, table

    readme = render(results, with_plots=with_plots)
    meta, runs, _ = load(results)
    print(table(meta, runs))
    print(f"report: {readme}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["curve"]:  # their own parsers: argparse's REMAINDER does not take leading options
        from e2e.bench.vcurve import main as curve_main

        return curve_main(args[1:])
    if args[:1] == ["curves"]:
        from e2e.bench.rtcurve import main as curves_main

        return curves_main(args[1:])
    if args[:1] == ["standing"]:
        from e2e.bench.standing import main as standing_main

        return standing_main(args[1:])
    a = _parser().parse_args(args)
    if a.cmd == "compare":
        return _compare(a)
    if a.cmd == "curve":
        from e2e.bench.vcurve import main as curve_main

        return curve_main(a.rest)
    if a.cmd == "curves":
        from e2e.bench.rtcurve import main as curves_main

        return curves_main(a.rest)
    if a.cmd == "report":
        _print_report(Path(a.results), with_plots=not a.no_plots)
        return 0
    if a.cmd == "workload":
        from e2e.bench.workloads import make

        try:
            params = parse_params(a.param)
            if a.requests is not None:
                params["num_requests"] = a.requests
            wl = make(a.workload, rate=a.rate, seed=a.seed, **params)
        except (ValueError, TypeError) as exc:
            print(f"kvswitch bench workload: {exc}", file=sys.stderr)
            return 2
        wl.write(a.out)
        print(json.dumps(wl.stats()))
        return 0
    if a.cmd == "peers":
        from e2e.bench import peersenv

        why = peersenv.missing()
        print(json.dumps(peersenv.versions(), indent=1))
        if why:
            print(why, file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
