"""The tables of this README from ``kvswitch plan --json`` files: best one-kind against best two-kind fleet
(replayed), and the best replayed fleet of each family.

    python table.py mix30-h100-mi300x.json mix20-30rps-h100-mi300x.json mix30-30rps-h100-mi300x.json
"""

import json
import pathlib
import sys
from typing import Any


def load(f: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(pathlib.Path(f).read_text())
    d["ok"] = [r for r in d["candidates"] if r["slo_attainment"] >= d["attainment_goal"]]
    d["name"] = pathlib.Path(f).stem.rsplit("-", 2)[0]
    d["cat"] = ", ".join(f"{k} {v}" for k, v in d["prices"].items())
    return d


def best(rows: Any) -> dict[str, Any] | None:
    return min(rows, key=lambda r: (r["cost_per_hour"], -r["slo_attainment"]), default=None)


def cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "none met the goal | | "
    return f"{r['fleet']} | {r['cost_per_hour']:.2f} | {r['slo_attainment']:.4f}"


def main(files: list[str]) -> None:
    print("| workload | catalogue | best one-kind fleet | $/h | attainment | best two-kind fleet | $/h | attainment "
          "| saving | best cross-kind P/D | $/h | attainment |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in files:
        d = load(f)
        one, two = best(r for r in d["ok"] if not r["mixed"]), best(r for r in d["ok"] if r["mixed"])
        xpd = best(r for r in d["ok"] if r["mixed"] and r["pd"])
        s = "" if one is None or two is None else f"{1 - two['cost_per_hour'] / one['cost_per_hour']:+.1%}"
        print(f"| {d['name']} ({d['requests']} req, {d['peak_rate']:.0f} req/s) | {d['cat']} | {cell(one)} | "
              f"{cell(two)} | {s} | {cell(xpd)} |")
    print()
    print("| workload | catalogue | family | best replayed fleet meeting the goal | $/h | attainment | replays |")
    print("|---|---|---|---|---|---|---|")
    for f in files:
        d = load(f)
        for fam in dict.fromkeys(r["family"] for r in d["candidates"] if "family" in r):
            b = best(r for r in d["ok"] if r.get("family") == fam)
            n = sum(1 for r in d["candidates"] if r.get("family") == fam)
            print(f"| {d['name']} | {d['cat']} | {fam} | {cell(b)} | {n} |")


if __name__ == "__main__":
    main(sys.argv[1:])
