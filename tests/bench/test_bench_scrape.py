"""e2e.bench.scrape runs both clients against real servers and reports each one's CPU per scrape and the ratio."""

from __future__ import annotations

import re

from e2e.bench.scrape import main


def test_the_scrape_bench_measures_both_clients(capsys):
    assert main(["--pods", "2", "--seconds", "0.4", "--rounds", "1", "--interval-ms", "20"]) == 0
    out = capsys.readouterr().out
    runs = re.findall(r"\] (kept-alive GET|aiohttp)\s+(\d+) scrapes", out)
    assert [name for name, _ in runs] == ["kept-alive GET", "aiohttp"]
    assert all(int(n) >= 10 for _, n in runs), out  # 2 pods every 20 ms for 0.4 s: ~40 each
    assert re.search(r"ratio \(aiohttp / kept-alive\): \d+\.\d+x", out)
