"""Data-parallel attention + expert-parallel experts in the one cost model: a rank's roofline, the all-to-all,
the straggler, and the vectorised evaluator pricing a rank exactly as the simulator charges it."""

from __future__ import annotations

import numpy as np
import pytest

from engine.costmodel import CostModel, Deployment
from engine.costmodel.dataparallel import DataParallelCost, rank_cost_model
from engine.costmodel.vector import RooflineTable, step_seconds_v, ttft_seconds
from pickers.costs import CostTable
from pickers.types import Endpoint


def test_a_rank_holds_the_dense_weights_and_its_share_of_the_experts():
    pod = CostModel("dsv3", "H200", Deployment(tp=1, ep=8))
    g = DataParallelCost("dsv3", "H200", Deployment(tp=1, ep=8))
    m = pod.model
    expert_bytes = m.expert_params * m.weight_bytes_per_param
    assert g.dp == 8
    assert g.rank.roofline.expert_bytes == pytest.approx(expert_bytes / 8)
    assert g.rank.roofline.dense_bytes == pytest.approx(pod.roofline.dense_bytes)
    assert g.rank.roofline.peak_flops == pytest.approx(pod.roofline.peak_flops / 8)
    # every rank has its own KV pool: together less than one engine over 8 GPUs would have, as each rank holds
    # the dense weights (17 GB in FP8) again: 8 x 26 GB of KV instead of 328 GB
    assert 0.5 * pod.kv_capacity_tokens < 8 * g.rank.kv_capacity_tokens < 0.7 * pod.kv_capacity_tokens


def test_all_to_all_is_in_the_roofline_and_dearer_across_nodes():
    one_node = DataParallelCost("dsv3", "H100", Deployment(tp=1, ep=8))
    two_nodes = DataParallelCost("dsv3", "H100", Deployment(tp=1, ep=16))
    base = CostModel(one_node.rank.model, "H100", Deployment(tp=1))
    assert one_node.rank.roofline.comm_s_per_token == pytest.approx(
        base.roofline.comm_s_per_token + one_node.a2a_s_per_token)
    assert two_nodes.a2a_s_per_token > 5 * one_node.a2a_s_per_token  # NIC, not NVLink
    assert DataParallelCost("8b", "H100").a2a_s_per_token == 0.0 and DataParallelCost("8b", "H100").dp == 1


def test_a_group_step_waits_for_its_slowest_rank():
    g = DataParallelCost("moe", "H200", dp=4)
    light, heavy = (8, 8 * 1024, 8 * 1024), (4096, 4096 * 4097 / 2, 0)
    assert g.step_time([light, light, heavy, (0, 0, 0)]) == pytest.approx(g.rank_step_time(*heavy))
    assert g.step_time([light] * 4) == pytest.approx(g.rank_step_time(*light))
    assert g.step_time([]) == 0.0


def test_the_picker_prices_a_rank_with_the_ranks_roofline():
    table = CostTable(4)
    table.set(0, Endpoint("10.0.0.1:8000", model_profile="moe", accelerator="H200", dp_rank=1, dp_size=4))
    table.set(1, Endpoint("10.0.0.2:8000", model_profile="moe", accelerator="H200"))
    rank = rank_cost_model("moe", "H200", 4)
    r = table.rooflines(np.array([0, 1]))
    n = np.array([512.0, 512.0])
    got = step_seconds_v(r, n, n * n / 2, np.zeros(2))
    assert got[0] == pytest.approx(rank.step_time(512, 512 * 512 / 2, 0), rel=1e-12)
    assert got[0] != pytest.approx(got[1])  # a rank is not the whole pod
    t = RooflineTable(1)
    t.set(0, rank.roofline)
    vec = ttft_seconds(t.gather(np.array([0])), 6000.0, np.array([1000.0]), np.array([2048.0]), np.array([3.0]),
                       np.array([2048.0]), 512.0)
    assert vec[0] == pytest.approx(rank.time_to_first_token(6000, 1000, budget=2048, queued=2048, running=3,
                                                             decode_context=512), rel=1e-9)
