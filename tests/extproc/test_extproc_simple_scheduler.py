"""LeastInFlight: least loaded first, full fallback list, subset and role honoured, hooks release load."""

from __future__ import annotations

import pytest

from pickers.simple import LeastInFlight
from pickers.types import Endpoint, InferenceRequest, Role, SchedulingError

EPS = [Endpoint("10.0.0.1:1", Role.DECODE), Endpoint("10.0.0.2:1", Role.BOTH), Endpoint("10.0.0.3:1", Role.PREFILL)]


def _req(subset=None):
    return InferenceRequest(request_id="r", model="m", subset=subset)


async def test_least_inflight_and_fallback_list_without_prefill_pods():
    s = LeastInFlight(EPS, seed=1)
    d1 = await s.schedule(_req())
    d2 = await s.schedule(_req())
    assert sorted([d1.primary, d2.primary]) == ["10.0.0.1:1", "10.0.0.2:1"]
    assert set(d1.endpoints) == {"10.0.0.1:1", "10.0.0.2:1"}
    s.on_finished(d1, None, 0.0)
    d3 = await s.schedule(_req())
    assert d3.primary == d1.primary and d3.endpoints[1] == d2.primary


async def test_subset_and_empty_subset():
    s = LeastInFlight(EPS)
    assert (await s.schedule(_req(["10.0.0.2:1"]))).endpoints == ["10.0.0.2:1"]
    with pytest.raises(SchedulingError) as e:
        await s.schedule(_req(["10.0.0.3:1"]))  # prefill-only pod never decodes
    assert e.value.status == 503


async def test_served_moves_the_count():
    s = LeastInFlight(EPS[:2], seed=0)
    d = await s.schedule(_req())
    other = d.endpoints[1]
    s.on_served(d, other)
    assert s.inflight[d.primary] == 0 and s.inflight[other] == 1
    s.on_failed(d, "x", 0.0)
    assert s.inflight == {"10.0.0.1:1": 0, "10.0.0.2:1": 0}


async def test_no_endpoints_is_503():
    with pytest.raises(SchedulingError) as e:
        await LeastInFlight([]).schedule(_req())
    assert e.value.status == 503 and "configured" in e.value.message
