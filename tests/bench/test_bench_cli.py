"""`kvswitch bench report` rewrites a report from results.json and prints its table."""

import shutil
from pathlib import Path

from e2e.bench.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "e2e/bench/results/2026-11-21-knee-3reps/results.json"


def test_report_prints_the_table_and_writes_the_readme(tmp_path, capsys):
    results = tmp_path / "results.json"
    shutil.copy(RESULTS, results)
    assert main(["report", str(results), "--no-plots"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| router | offered req/s | req/s")
    routers = {row.split("|")[1].strip() for row in rows[1:]}
    assert routers == {"kvswitch", "sglang-router:cache_aware", "vllm-router:cache_aware", "envoy-rr"}
    assert out.rstrip().endswith(f"report: {tmp_path / 'README.md'}")
    assert (tmp_path / "README.md").read_text().count("| kvswitch | 20 |") == 1
