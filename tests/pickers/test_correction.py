"""The online correction's fit (pickers/correction.py): robust to a few outliers, exact on clean data."""

from __future__ import annotations

import numpy as np
import pytest

from pickers.correction import OnlineCorrection, _capped_rel_error, _mape_scale, _Series
from pickers.types import Endpoint

KEY = ("llama-3.1-8b", "H100", "both")


def correction_with_one_pod() -> OnlineCorrection:
    cr = OnlineCorrection(max_endpoints=4, window=64)
    cr.on_endpoint("add", 0, Endpoint("10.0.0.1:8000"))
    return cr


def corrected(cr: OnlineCorrection, raw: float) -> float:
    return float(cr.ttft_a[0] + cr.ttft_b[0] * raw)


def test_two_requests_observed_far_below_their_prediction_do_not_drag_the_correction():
    """The case that set the H100 TTFT slope to 0.16 (a 0.90 s prediction corrected to 0.15 s): a window
    of requests observed as predicted (within 5 %) and two observed 20-30x faster. The least-squares fit on
    relative error weights those two by 1 / observed^2, ~1000x the others, and follows them."""
    cr = correction_with_one_pod()
    rng = np.random.default_rng(3)
    for raw in rng.uniform(0.2, 2.0, 62):
        cr.observe(0, "ttft", raw, raw * rng.uniform(0.95, 1.05))
    cr.observe(0, "ttft", 0.9, 0.03)
    cr.observe(0, "ttft", 1.5, 0.08)
    assert cr.ttft_b[0] > 0.9
    for raw in (0.2, 0.9, 2.0):
        assert corrected(cr, raw) == pytest.approx(raw, rel=0.05)


def test_a_minority_of_fast_outliers_does_not_hide_a_fixed_overhead():
    """A real engine: 20 ms of overhead on top of the roofline, 10 % noise, and 6 of 64 requests observed at
    a quarter of that (a stall elsewhere emptied the queue). The affine fit must still find the overhead
    and slope: neither the least-squares line (dragged by the fast ones) nor the median ratio (no overhead)
    predicts the typical request within 10 %."""
    cr = correction_with_one_pod()
    rng = np.random.default_rng(11)
    raws = rng.uniform(0.007, 0.06, 64)
    fast = set(rng.choice(64, 6, replace=False).tolist())
    for i, raw in enumerate(raws):
        obs = (0.02 + raw) * rng.lognormal(0.0, 0.1)
        cr.observe(0, "ttft", raw, obs * 0.25 if i in fast else obs)
    assert cr.ttft_a[0] == pytest.approx(0.02, rel=0.25) and cr.ttft_b[0] == pytest.approx(1.0, rel=0.25)
    for raw in (0.01, 0.03, 0.06):
        assert corrected(cr, raw) == pytest.approx(0.02 + raw, rel=0.1)


def test_the_affine_fit_is_exact_on_clean_data_and_close_on_noisy_data():
    s = _Series(64)
    rng = np.random.default_rng(5)
    for raw in rng.uniform(0.01, 3.0, 40):
        s.add(raw, 0.05 + 1.7 * raw)
    a, b = s.fit(8)
    assert a == pytest.approx(0.05, rel=1e-9) and b == pytest.approx(1.7, rel=1e-9)
    noisy = _Series(64)
    for raw in rng.uniform(0.01, 3.0, 64):
        noisy.add(raw, (0.05 + 1.7 * raw) * rng.lognormal(0.0, 0.1))
    a, b = noisy.fit(8)
    assert a == pytest.approx(0.05, rel=0.3) and b == pytest.approx(1.7, rel=0.1)


def test_a_pure_scale_stays_a_scale_and_few_points_keep_the_cost_model():
    s = _Series(64)
    for raw in (0.5, 0.1, 2.0):
        s.add(raw, 3.0 * raw)
    assert s.fit(8) == (0.0, 1.0)  # three requests are anecdotes
    for raw in np.linspace(0.01, 2.0, 30):
        s.add(float(raw), 1.5 * float(raw))
    a, b = s.fit(8)
    assert a == pytest.approx(0.0, abs=1e-9) and b == pytest.approx(1.5, rel=1e-9)


@pytest.mark.parametrize("mape", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_the_fit_in_use_is_never_worse_than_the_median_ratio_in_capped_relative_error(seed, mape):
    """The invariant of the module doc, on windows with up to 40 % of gross outliers either way; for TPOT
    (``mape``) against its scale, the relative-error minimiser."""
    rng = np.random.default_rng(seed)
    s = _Series(64, mape=mape)
    a0, b0 = rng.uniform(0.0, 0.1), rng.uniform(0.3, 3.0)
    for _ in range(int(rng.integers(8, 130))):
        raw = float(rng.uniform(0.005, 2.0))
        obs = (a0 + b0 * raw) * float(rng.lognormal(0.0, 0.2))
        if rng.random() < 0.4 * seed / 20:
            obs *= float(rng.choice([0.05, 0.2, 5.0, 20.0]))
        s.add(raw, obs)
    k = min(s.n, s.window)
    x, y = s.raw[:k], s.obs[:k]
    a, b = s.fit(8)
    ratio = float(np.clip(_mape_scale(x, y) if mape else np.median(y / x), 0.02, 50.0))
    assert _capped_rel_error(x, y, a, b) <= _capped_rel_error(x, y, 0.0, ratio)
    assert a >= 0.0 and 0.02 <= b <= 50.0


def test_the_tpot_scale_minimises_relative_error_on_a_right_skewed_window():
    """TPOT on an aggregated pod: most requests decode as predicted (ratio ~1), those that prompts arrived
    on during their decode 1.5-4x slower. The plain median ratio (what TTFT keeps) sits inside that tail;
    the TPOT scale is the relative-error minimiser, the median weighted by raw / observed."""
    cr = correction_with_one_pod()
    rng = np.random.default_rng(7)
    xs, ys = [], []
    for i in range(64):
        raw = float(rng.uniform(0.010, 0.012))  # raw predictions too alike for an affine fit: the scale
        obs = raw * (float(rng.uniform(0.97, 1.03)) if i % 20 < 9 else float(rng.uniform(1.5, 4.0)))
        xs.append(raw)
        ys.append(obs)
        cr.observe(0, "tpot", raw, obs)
        cr.observe(0, "ttft", raw, obs)
    x, y = np.array(xs), np.array(ys)

    def mape(b: float) -> float:
        return float(np.mean(np.abs(b * x - y) / y))

    median = float(np.median(y / x))
    assert median > 1.4 and cr.ttft_b[0] == pytest.approx(median)  # TTFT: the plain median ratio
    assert cr.tpot_a[0] == 0.0 and cr.tpot_b[0] < 1.05
    best = min(mape(float(b)) for b in y / x)  # the minimiser is one of the ratios
    assert mape(cr.tpot_b[0]) == pytest.approx(best, rel=1e-12)
    assert mape(cr.tpot_b[0]) < 0.8 * mape(median)
