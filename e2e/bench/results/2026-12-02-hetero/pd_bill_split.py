"""How a P/D fleet's bill splits between its prefill and decode pools on the chat + long-prompt mix, from the
one cost model (large-fleet limit, catalogue prices, TTFT 2 s / TPOT 60 ms, goal 0.99 over the whole mix):
the cheapest prefill pool, the cheapest decode pool, the best P/D fleet, and the best one-kind P/D fleet of
each kind with the most that any other decode kind could save on it (its whole decode bill).

    nice -n 19 .venv/bin/python e2e/bench/results/2026-12-02-hetero/pd_bill_split.py
"""
from e2e.bench.planner_mix import GOAL, TARGETS, _pd_capacity, classes, kinds_of
from pickers.planner import LoadShape
from pickers.planner.catalogue import DEFAULT_PRICES as P

chat, long, ci, co, li, lo = classes()
for share in (0.1, 0.2, 0.3):
    nl = int(round(share * 4000))
    mix = LoadShape.from_lengths(ci[:4000 - nl] + li[:nl], co[:4000 - nl] + lo[:nl])
    rows = []
    for pn in P:
        for pk in kinds_of(pn):
            for dn in P:
                for dk in kinds_of(dn):
                    pc, dc = _pd_capacity(pk, dk, mix, GOAL, TARGETS["ttft_s"], TARGETS["tpot_s"])
                    if pc <= 0 or dc <= 0:
                        continue
                    pre, dec = P[pn] * pk.gpus / pc, P[dn] * dk.gpus / dc
                    rows.append((pre + dec, pre, dec, pn, dn, f"{pn} tp{pk.tp} -> {dn} tp{dk.tp}"))
    rows.sort()
    bp = min(rows, key=lambda r: r[1])
    bd = min(rows, key=lambda r: r[2])
    print(f"long {share:.0%}: cheapest prefill pool ${bp[1]:.3f} per req/s-hour ({bp[5]}), cheapest decode pool "
          f"${bd[2]:.3f} ({bd[5]}); best P/D ${rows[0][0]:.3f} ({rows[0][5]}), decode {rows[0][2] / rows[0][0]:.0%} "
          f"of it")
    for k in P:
        one = [r for r in rows if r[3] == k and r[4] == k]
        if one:
            b = one[0]
            print(f"    {k}-only P/D ${b[0]:.3f} ({b[5]}): prefill ${b[1]:.3f}, decode ${b[2]:.3f} = {b[2] / b[0]:.0%} "
                  f"of the bill (the most a cheaper decode kind could save)")
