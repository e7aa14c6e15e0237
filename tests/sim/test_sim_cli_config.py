"""Fleet YAML validation and the `kvswitch sim` command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.sim.fleet import parse_fleet_config, specs_from_config

ROOT = Path(__file__).resolve().parents[2]


def test_fleet_config_expands_groups():
    cfg = parse_fleet_config({
        "defaults": {"model_profile": "llama-3.1-70b"},
        "pods": [{"count": 2, "role": "prefill", "accelerator": "H200"},
                 {"count": 3, "role": "decode", "name": "dec", "accelerator": "H100", "block_size": 32}],
    })
    specs = specs_from_config(cfg)
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "dec-0", "dec-1", "dec-2"]
    assert [s.accelerator for s in specs] == ["H200"] * 2 + ["H100"] * 3
    assert {s.model_profile for s in specs} == {"llama-3.1-70b"} and specs[2].block_size == 32


@pytest.mark.parametrize("data,needle", [
    ({"pods": [{"count": 1, "colour": "red"}]}, "colour"),
    ({"pods": [{"count": "two"}]}, "count"),
    ({"pod": []}, "pod"),
    ({"pods": [{"role": "router"}]}, "role"),
    ({"pods": [{"accelerator": "TPU9"}]}, "TPU9"),
    ({"pods": [{"count": 2}, {"count": 1}]}, "duplicate"),
])
def test_fleet_config_errors_name_the_key(data, needle):
    with pytest.raises(ValueError, match=needle):
        specs_from_config(parse_fleet_config(data))


def test_cli_prints_pods_then_ready_and_stops_on_sigterm(tmp_path):
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("pods:\n  - {count: 1, role: prefill, accelerator: H200}\n  - {count: 1, role: decode}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.sim", "--config", str(cfg), "--base-port", "0",
         "--kv-events-base-port", "0", "--time-scale", "0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[2] == "ready", lines
        assert "role=prefill accelerator=H200" in lines[0] and "role=decode" in lines[1]
        assert "kv_blocks=" in lines[0] and "http://127.0.0.1:" in lines[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)  # drains and closes both pipes
    assert proc.returncode == 0, err


def test_cli_rejects_bad_config(tmp_path):
    from engine.sim.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pods:\n  - {count: 1, speed: 3}\n")
    assert main(["--config", str(cfg)]) == 2


def test_replay_hook():
    from engine.sim.cli import main

    try:
        import engine.sim.cluster.cli  # noqa: F401
    except ModuleNotFoundError:
        assert main(["replay", "--help"]) == 2
    else:
        with pytest.raises(SystemExit) as exc:
            main(["replay", "--help"])
        assert exc.value.code == 0
