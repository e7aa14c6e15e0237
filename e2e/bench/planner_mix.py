"""When does mixing accelerator kinds pay? The cost model's price per request/s of SLO capacity, per class.

    python -m e2e.bench.planner_mix --accelerators H100=2.49,L40S=0.86,MI300X=2.19 --long-shares 0.05,0.1,0.2,0.3 \\
        --json mix.json [--png mix.png]

A workload mixing chat turns and long prompts (the ``day`` generator's two classes, constant rate) is split by
class; each pool's cost per request/s is price x GPUs per pod / the pod's capacity within the SLO
(``pickers.planner.capacity.pod_capacity``, the one cost model), at the pool's share of the miss budget
(``search.split_goals``). This is the large-fleet limit of ``kvswitch plan`` (no rounding up to whole pods):

- best one-kind fleet: one pool of the whole mix, or the two classes on two pools of one kind (any TP each);
- best mixed fleet: long prompts on one kind, chat on another;
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
from pickers.planner.search import split_goals

TTFT_S, TPOT_S, GOAL = 2.0, 0.06, 0.99
BUDGET_SHARES = (0.5, 0.8, 0.95)


def classes(n: int = 4000, seed: int = 0) -> tuple[LoadShape, LoadShape, list[int], list[int], list[int], list[int]]:
    """(chat shape, long shape, and their raw lengths): the day generator's classes (lognormal lengths)."""
    rng = np.random.default_rng(seed)
    chat_in = np.clip(rng.lognormal(math.log(1500), 0.8, n), 16, 32768).astype(int).tolist()
    chat_out = np.clip(rng.lognormal(math.log(250), 0.7, n), 1, 2048).astype(int).tolist()
    long_in = np.clip(rng.lognormal(math.log(12000), 0.5, n), 16, 32768).astype(int).tolist()
    long_out = np.clip(rng.lognormal(math.log(120), 0.6, n), 1, 2048).astype(int).tolist()
    return (LoadShape.from_lengths(chat_in, chat_out), LoadShape.from_lengths(long_in, long_out),
            chat_in, chat_out, long_in, long_out)


@lru_cache(maxsize=4096)
def _capacity(kind: PodKind, shape: LoadShape, goal: float) -> float:
    return pod_capacity(kind, shape, TTFT_S, TPOT_S, goal)  # does not depend on prices: the scans reuse it


def per_rate(kind: PodKind, price: float, shape: LoadShape, goal: float) -> float:
    """USD per hour per request/s of this shape on pods of ``kind`` at ``goal`` (inf: cannot serve it)."""
    cap = _capacity(kind, shape, goal)
    return price * kind.gpus / cap if cap > 0 else math.inf


@dataclass(slots=True)
class Point:
    long_share: float
    one_kind: float  # USD/h per req/s, best one-kind fleet
    one_kind_fleet: str
    mixed: float
    mixed_fleet: str
    saving: float


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
    for name, ks in by_kind.items():
        for k in ks:  # one pool of the whole mix
            c = per_rate(k, prices[name], mix, GOAL)
            best_one = min(best_one, (c, f"{name} tp{k.tp}"))
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
    return Point(share, best_one[0], best_one[1], best_mixed[0], best_mixed[1], saving)


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
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    try:
        prices = parse_accelerators(args.accelerators).prices
        shares = [float(x) for x in args.long_shares.split(",")]
        if any(not 0 < s < 1 for s in shares):
            raise ValueError("--long-shares must be in (0, 1)")
    except ValueError as exc:
        print(f"planner_mix: {exc}", file=sys.stderr)
        return 2
    chat, long, chat_in, chat_out, long_in, long_out = classes()
    out: dict[str, object] = {"prices": prices, "ttft_s": TTFT_S, "tpot_s": TPOT_S, "goal": GOAL, "pairs": []}
    for a, b in itertools.combinations(prices, 2):
        pair = {a: prices[a], b: prices[b]}
        for share in shares:
            n_long = int(round(share * 4000))
            mix = LoadShape.from_lengths(chat_in[: 4000 - n_long] + long_in[:n_long],
                                         chat_out[: 4000 - n_long] + long_out[:n_long])
            pt = evaluate(pair, share, chat, long, mix)
            be = {k: break_even(pair, k, share, args.target, (chat, long, mix)) for k in pair}
            row = {**asdict(pt), "kinds": [a, b], "break_even_chat_price": be}
            out["pairs"].append(row)  # type: ignore[attr-defined]
            be_text = ", ".join(f"{k} at ${v[1]:.2f}-{v[0]:.2f}" if v is not None else f"{k}: no price"
                                for k, v in be.items())
            print(f"{a}+{b} long {share:.0%}: one kind ${pt.one_kind:.3f} ({pt.one_kind_fleet}), mixed "
                  f"${pt.mixed:.3f} ({pt.mixed_fleet}): saving {pt.saving:+.1%}; {args.target:.0%} with "
                  f"{be_text}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
