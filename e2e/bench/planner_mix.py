"""When does mixing accelerator kinds pay? The cost model's price per request/s of SLO capacity, per class.

    python -m e2e.bench.planner_mix --accelerators H100=2.49,L40S=0.86,MI300X=2.19 --long-shares 0.05,0.1,0.2,0.3 \\
        [--long-median 12000] [--ttft-ms 2000 --tpot-ms 60] [--pairs] --json mix.json

A workload mixing chat turns and long prompts (the ``day`` generator's two classes, constant rate) is split by
class; each pool's cost per request/s is price x GPUs per pod / the pod's capacity within the SLO
(``pickers.planner.capacity.pod_capacity``, the one cost model), at the pool's share of the miss budget
(``search.split_goals``). This is the large-fleet limit of ``kvswitch plan`` (no rounding up to whole pods):

- best one-kind fleet: one pool of the whole mix, the two classes on two pools of one kind (any TP each), or
  a prefill pool and a decode pool of one kind (any TP each; ``capacity.prefill_capacity`` /
  ``decode_capacity``, the whole mix at the goal);
- best mixed fleet: long prompts on one kind, chat on another; or prefill on one kind, decode on another;
- saving = 1 - mixed / one-kind; and, for each kind of the pair, the window of its price (the other's held)
  in which the saving reaches ``--target`` (20 %), scanning its price down to 5 % of the catalogue's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pickers.planner import LoadShape, PodKind, parse_accelerators, pod_capacity
from pickers.planner.capacity import decode_capacity, decode_tpot, prefill_capacity
from pickers.planner.search import split_goals

GOAL = 0.99
BUDGET_SHARES = (0.5, 0.8, 0.95)
TARGETS = {"ttft_s": 2.0, "tpot_s": 0.06}  # main() sets them from --ttft-ms / --tpot-ms


def classes(n: int = 4000, seed: int = 0, long_median: int = 12000
            ) -> tuple[LoadShape, LoadShape, list[int], list[int], list[int], list[int]]:
    """(chat shape, long shape, and their raw lengths): the day generator's classes (lognormal lengths)."""
    rng = np.random.default_rng(seed)
    chat_in = np.clip(rng.lognormal(math.log(1500), 0.8, n), 16, 32768).astype(int).tolist()
    chat_out = np.clip(rng.lognormal(math.log(250), 0.7, n), 1, 2048).astype(int).tolist()
    long_in = np.clip(rng.lognormal(math.log(long_median), 0.5, n), 16, 32768).astype(int).tolist()
    long_out = np.clip(rng.lognormal(math.log(120), 0.6, n), 1, 2048).astype(int).tolist()
    return (LoadShape.from_lengths(chat_in, chat_out), LoadShape.from_lengths(long_in, long_out),
            chat_in, chat_out, long_in, long_out)


@lru_cache(maxsize=4096)
def _capacity(kind: PodKind, shape: LoadShape, goal: float, ttft_s: float, tpot_s: float) -> float:
    return pod_capacity(kind, shape, ttft_s, tpot_s, goal)  # does not depend on prices: the scans reuse it


@lru_cache(maxsize=4096)
def _pd_capacity(prefill: PodKind, decode: PodKind, shape: LoadShape, goal: float, ttft_s: float,
                 tpot_s: float) -> tuple[float, float]:
    """(prefill pod's, decode pod's) requests/s, as ``search.disaggregated`` sizes them (the first decode step
    taken at a decode pod's full capacity: no rounding to whole pods here)."""
    dcap = decode_capacity(decode, shape, tpot_s)
    if dcap <= 0:
        return 0.0, 0.0
    first = decode_tpot(decode, shape, dcap)
    return prefill_capacity(prefill, shape, ttft_s, goal, decode=decode, first_step_s=first), dcap


def per_rate(kind: PodKind, price: float, shape: LoadShape, goal: float) -> float:
    """USD per hour per request/s of this shape on pods of ``kind`` at ``goal`` (inf: cannot serve it)."""
    cap = _capacity(kind, shape, goal, TARGETS["ttft_s"], TARGETS["tpot_s"])
    return price * kind.gpus / cap if cap > 0 else math.inf


def pd_per_rate(prefill: PodKind, p_price: float, decode: PodKind, d_price: float, shape: LoadShape,
                goal: float) -> float:
    """USD per hour per request/s of a P/D fleet: prefill pods of one kind, decode pods of another."""
    pcap, dcap = _pd_capacity(prefill, decode, shape, goal, TARGETS["ttft_s"], TARGETS["tpot_s"])
    if pcap <= 0 or dcap <= 0:
        return math.inf
    return p_price * prefill.gpus / pcap + d_price * decode.gpus / dcap


@dataclass(slots=True)
class Point:
    long_share: float
    one_kind: float  # USD/h per req/s, best one-kind fleet
    one_kind_fleet: str
    mixed: float
    mixed_fleet: str
    saving: float
    pd_one_kind: float = math.inf  # the best P/D fleet of one kind (included in one_kind above)
    pd_mixed: float = math.inf  # the best P/D fleet of two kinds (included in mixed above)
    pd_mixed_fleet: str = ""


def kinds_of(name: str) -> list[PodKind]:
    out = []
    for tp in (1, 2, 4):
        try:
            k = PodKind(name, "8b", tp)
            if k.cost().kv_capacity_tokens > 0:
                out.append(k)
        except ValueError:
            continue
    return out


def evaluate(prices: dict[str, float], share: float, chat: LoadShape, long: LoadShape, mix: LoadShape
             ) -> Point:
    best_one: tuple[float, str] = (math.inf, "")
    best_mixed: tuple[float, str] = (math.inf, "")
    by_kind = {k: kinds_of(k) for k in prices}
    pd_one = math.inf
    pd_mixed: tuple[float, str] = (math.inf, "")
    for name, ks in by_kind.items():
        for k in ks:  # one pool of the whole mix
            c = per_rate(k, prices[name], mix, GOAL)
            best_one = min(best_one, (c, f"{name} tp{k.tp}"))
    for (pn, pks), (dn, dks) in itertools.product(by_kind.items(), by_kind.items()):
        for pk, dk in itertools.product(pks, dks):  # P/D: the whole mix prefilled on pk, decoded on dk
            c = pd_per_rate(pk, prices[pn], dk, prices[dn], mix, GOAL)
            label = f"P/D prefill {pn} tp{pk.tp} + decode {dn} tp{dk.tp}"
            if pn == dn:
                best_one = min(best_one, (c, label))
                pd_one = min(pd_one, c)
            else:
                best_mixed = min(best_mixed, (c, label))
                pd_mixed = min(pd_mixed, (c, label))
    for f in BUDGET_SHARES:
        g_long, g_chat = split_goals(GOAL, share, f)
        long_cost = {(n, k.tp): per_rate(k, prices[n], long, g_long) for n, ks in by_kind.items() for k in ks}
        chat_cost = {(n, k.tp): per_rate(k, prices[n], chat, g_chat) for n, ks in by_kind.items() for k in ks}
        for (ln, ltp), lc in long_cost.items():
            for (cn, ctp), cc in chat_cost.items():
                total = share * lc + (1 - share) * cc
                label = f"long {ln} tp{ltp} + chat {cn} tp{ctp} (miss budget {f:.0%} long)"
                if ln == cn:
                    best_one = min(best_one, (total, label))
                else:
                    best_mixed = min(best_mixed, (total, label))
    saving = 1 - best_mixed[0] / best_one[0] if math.isfinite(best_one[0]) else math.nan
    return Point(share, best_one[0], best_one[1], best_mixed[0], best_mixed[1], saving, pd_one, *pd_mixed)


def break_even(prices: dict[str, float], kind: str, share: float, target: float, shapes: tuple[LoadShape, ...]
               ) -> tuple[float, float] | None:
    """The window of prices of ``kind`` (others held) at which mixing saves at least ``target``: (highest,
    lowest), scanning down from its price in 3 % steps to 5 % of it; None when no price in it does. A window,
    not a threshold: far below, ``kind`` alone becomes the cheapest one-kind fleet and mixing stops paying."""
    chat, long, mix = shapes
    hits = []
    for i in range(100):
        p = prices[kind] * 0.97 ** i
        if p < 0.05 * prices[kind]:
            break
        s = evaluate({**prices, kind: p}, share, chat, long, mix).saving
        if s == s and s >= target:
            hits.append(p)
    return (max(hits), min(hits)) if hits else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.bench.planner_mix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerators", default="H100=2.49,L40S=0.86")
    p.add_argument("--long-shares", default="0.05,0.1,0.2,0.3")
    p.add_argument("--target", type=float, default=0.2)
    p.add_argument("--long-median", type=int, default=12000, help="long prompts' median length (tokens)")
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--tpot-ms", type=float, default=60.0)
    p.add_argument("--no-break-even", action="store_true", help="skip the price scans (fast)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    try:
        prices = parse_accelerators(args.accelerators).prices
        shares = [float(x) for x in args.long_shares.split(",")]
        if any(not 0 < s < 1 for s in shares):
            raise ValueError("--long-shares must be in (0, 1)")
        if not args.ttft_ms > 0 or not args.tpot_ms > 0 or not 16 <= args.long_median <= 32768:
            raise ValueError("targets must be positive and --long-median in [16, 32768]")
    except ValueError as exc:
        print(f"planner_mix: {exc}", file=sys.stderr)
        return 2
    TARGETS.update(ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3)
    chat, long, chat_in, chat_out, long_in, long_out = classes(long_median=args.long_median)
    out: dict[str, object] = {"prices": prices, **TARGETS, "goal": GOAL, "long_median": args.long_median,
                              "pairs": []}
    for a, b in itertools.combinations(prices, 2):
        pair = {a: prices[a], b: prices[b]}
        for share in shares:
            n_long = int(round(share * 4000))
            mix = LoadShape.from_lengths(chat_in[: 4000 - n_long] + long_in[:n_long],
                                         chat_out[: 4000 - n_long] + long_out[:n_long])
            pt = evaluate(pair, share, chat, long, mix)
            be = {} if args.no_break_even else {
                k: break_even(pair, k, share, args.target, (chat, long, mix)) for k in pair}
            row = {**asdict(pt), "kinds": [a, b], "break_even_chat_price": be}
            out["pairs"].append(row)  # type: ignore[attr-defined]
            be_text = ", ".join(f"{k} at ${v[1]:.2f}-{v[0]:.2f}" if v is not None else f"{k}: no price"
                                for k, v in be.items())
            print(f"{a}+{b} long {share:.0%}: one kind ${pt.one_kind:.3f} ({pt.one_kind_fleet}), mixed "
                  f"${pt.mixed:.3f} ({pt.mixed_fleet}): saving {pt.saving:+.1%}; {args.target:.0%} with "
                  f"{be_text}; best P/D one kind ${pt.pd_one_kind:.3f}, two kinds ${pt.pd_mixed:.3f} "
                  f"({pt.pd_mixed_fleet})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
