"""Online correction of the cost model's latency predictions, per (model profile, accelerator, role).

The roofline (engine/costmodel) knows a pod's model and accelerator, not its software: a real engine's
fixed per-request overhead (HTTP, tokenization, scheduling) and its kernels' efficiency shift every
prediction the same way on every pod of one kind. So the picker learns, per kind of pod, a map from the
raw prediction to what it then observes:

    observed ~= a + b x raw                      (a >= 0 seconds, b > 0)

fitted on the last ``window`` finished requests of that kind, on relative error (each point weighted by
1 / observed^2, so a 20 ms request counts as much as a 2 s one) with recent requests weighing more (weight
halves every ``half_life`` requests: a pod's speed drifts with its co-tenants and its cache). With fewer
than 4 points it keeps the raw cost model (one cold start is not a trend); until ``min_fit`` points are in,
or when the raw predictions are too alike to separate a from b, it uses the median ratio observed / raw
(a = 0).

The affine fit is robust, because a least-squares fit on relative error is not: a request observed far
below its prediction (a cache hit the picker did not know of, a stall elsewhere that emptied the queue)
gets a huge weight 1 / observed^2, and two of them once set an H100 TTFT slope to 0.16 while the window's
median ratio was 1.00 (a 0.90 s prediction corrected to 0.15 s; observed 0.91 s). So:

1. the start is the weighted least-squares line if its capped relative error over the window (the mean of
   |fitted - observed| / observed, each point's capped at 0.5: a bounded loss) is below the median
   ratio's, else the median ratio;
2. four passes of iteratively reweighted least squares with Tukey's biweight on the relative residuals
   (observed - fitted) / observed: a point more than 4.685 robust standard deviations (1.4826 x the
   residuals' median absolute deviation) off the line gets weight 0 instead of a huge one;
3. the result is kept only if its capped relative error over the window is below the median ratio's;
   otherwise the median ratio (a = 0).

Invariant: the correction in use never has a larger capped relative error over the window than the
median ratio (which only half the window or more can move), and no point adds more than 0.5 / k to that
error (k points in the window): a few outliers cannot buy a line that misses the rest of the window. Both
TTFT (attributed to the pod that ran the prefill) and TPOT (to the decode pod) are learned separately.

TPOT's scale is not the plain median ratio but the one that minimises the window's mean relative error (the
median of observed / raw weighted by raw / observed), and "the median ratio" above reads as that scale. On an
aggregated pod a request's TPOT is its decode step (ratio ~1) unless prompts arrive during its decode and
share chunked-prefill steps with it (ratio 1.5-5): the ratio is skewed right, so its plain median sits above
what minimises relative error, and the correction scaled every prediction up by it (virtual time, mixed
fleet, H100 TPOT MAPE 42.7 % against 38.3 % at 1.25x). TTFT keeps the plain median ratio: its errors go
both ways and the real-vLLM test (e2e/test_vllm_prediction.py) was tuned on it.

Other invariants: memory is ``window`` floats x 4 per kind of pod (kinds are bounded by the endpoint table);
a refit is O(window) (five weighted sums and a few medians over at most ``window`` points);
the decision path only reads two arrays per kind of latency (``ttft_a/ttft_b``, ``tpot_a/tpot_b``,
indexed by endpoint slot), refreshed when an observation arrives; a fresh picker predicts the raw cost
model exactly (a = 0, b = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pickers.types import Endpoint

GroupKey = tuple[str, str, str]  # (model profile, accelerator, role)
B_MIN, B_MAX = 0.02, 50.0  # a kind of pod 50x slower or faster than its roofline is a wrong profile
ROBUST_ITERATIONS = 4  # reweighting passes of the affine fit (each a weighted least squares over the window)
BIWEIGHT_C = 4.685  # Tukey's biweight constant (95 % efficiency on normal residuals)
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a normal
MIN_SCALE = 1e-3  # relative-residual scale floor: an exact fit keeps every point within 0.5 %
ERROR_CAP = 0.5  # in the fits' comparison a point counts at most this relative error (a miss is a miss)


@dataclass(slots=True)
class _Series:
    """The last ``window`` (raw prediction, observation) pairs of one latency of one kind of pod."""

    window: int
    half_life: float = 16.0
    raw: np.ndarray = field(init=False)
    obs: np.ndarray = field(init=False)
    n: int = 0  # total seen (the ring position is n % window)
    mape: bool = False  # scale fallback: the relative-error minimiser (TPOT) instead of the median ratio

    def __post_init__(self) -> None:
        self.raw = np.zeros(self.window)
        self.obs = np.zeros(self.window)

    def add(self, raw: float, obs: float) -> None:
        i = self.n % self.window
        self.raw[i] = raw
        self.obs[i] = obs
        self.n += 1

    def fit(self, min_fit: int, min_ratio: int = 4) -> tuple[float, float]:
        """(a, b) of ``observed ~= a + b x raw`` over the window (see the module doc for the rule)."""
        k = min(self.n, self.window)
        if k < min_ratio:  # a few requests are anecdotes (a cold start, a stall): keep the cost model
            return 0.0, 1.0
        x, y = self.raw[:k], self.obs[:k]
        ratio = min(max(_mape_scale(x, y) if self.mape else _median(y / x), B_MIN), B_MAX)
        if k < min_fit or float(x.max()) < 1.5 * float(x.min()):
            return 0.0, ratio
        newest = (self.n - 1) % self.window
        age = (newest - np.arange(k)) % self.window if self.n > self.window else (k - 1 - np.arange(k))
        w = np.exp2(-age / self.half_life) / (y * y)
        scale_err = _capped_rel_error(x, y, 0.0, ratio)
        got = _weighted_affine(x, y, w)
        a, b = got if got is not None and _capped_rel_error(x, y, *got) < scale_err else (0.0, ratio)
        for _ in range(ROBUST_ITERATIONS):  # Tukey's biweight on the relative residuals, from the better start
            r = (y - a - b * x) / y
            s = max(MAD_TO_SIGMA * _median(np.abs(r - _median(r))), MIN_SCALE)
            u = np.minimum(np.abs(r) / (BIWEIGHT_C * s), 1.0)
            got = _weighted_affine(x, y, w * (1.0 - u * u) ** 2)
            if got is None:
                break
            converged = abs(got[0] - a) <= 1e-9 * (abs(a) + 1e-9) and abs(got[1] - b) <= 1e-9 * b
            a, b = got
            if converged:  # an exact fit converges at once
                break
        if _capped_rel_error(x, y, a, b) < scale_err:
            return a, b
        return 0.0, ratio


def _median(v: np.ndarray) -> float:
    """np.median of a small 1-D array, by partition (np.median's overhead dominates at window sizes)."""
    m = v.size // 2
    if v.size % 2:
        return float(np.partition(v, m)[m])
    p = np.partition(v, (m - 1, m))
    return 0.5 * float(p[m - 1] + p[m])


def _mape_scale(x: np.ndarray, y: np.ndarray) -> float:
    """The scale b minimising the mean relative error of ``b x`` against ``y``: sum |b x - y| / y =
    sum (x / y) |b - y / x|, so the median of the ratios y / x weighted by x / y (the lower one on a tie)."""
    ratio = y / x
    order = np.argsort(ratio)
    w = np.cumsum((x / y)[order])
    return float(ratio[order[int(np.searchsorted(w, 0.5 * w[-1]))]])


def _capped_rel_error(x: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    """Mean relative error of ``a + b x`` against ``y``, each point's capped at ``ERROR_CAP``: a bounded loss, so
    an outlier adds at most ERROR_CAP / len(y), while every point counts (a median would ignore the small
    requests that alone show a fixed overhead)."""
    return float(np.minimum(np.abs(a + b * x - y) / y, ERROR_CAP).mean())


def _weighted_affine(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """Weighted least squares ``y ~= a + b x``; None when it is degenerate or outside a >= 0, B_MIN <= b <= B_MAX."""
    wx = w * x
    sw, sx, sy = float(w.sum()), float(wx.sum()), float(w @ y)
    sxx, sxy = float(wx @ x), float(wx @ y)
    det = sw * sxx - sx * sx
    if not det > 0.0:  # also a NaN, or every weight zero
        return None
    b = (sw * sxy - sx * sy) / det
    a = (sy - b * sx) / sw
    if not (math.isfinite(a) and math.isfinite(b)) or b < B_MIN or b > B_MAX or a < 0.0:
        return None
    return a, b


@dataclass(slots=True)
class _Group:
    ttft: _Series
    tpot: _Series
    slots: set[int] = field(default_factory=set)


class OnlineCorrection:
    """Per endpoint slot: the affine correction of its kind's TTFT and TPOT predictions (see module doc)."""

    def __init__(self, max_endpoints: int = 1024, window: int = 64, min_fit: int = 8, refit_every: int = 4) -> None:
        n = max_endpoints
        self.window = window
        self.min_fit = min_fit
        self.refit_every = refit_every
        self.ttft_a = np.zeros(n)
        self.ttft_b = np.ones(n)
        self.tpot_a = np.zeros(n)
        self.tpot_b = np.ones(n)
        self.group_of: list[GroupKey | None] = [None] * n
        self._groups: dict[GroupKey, _Group] = {}

    @staticmethod
    def key(ep: Endpoint) -> GroupKey:
        return (ep.model_profile, ep.accelerator, ep.role.value)

    def on_endpoint(self, what: str, slot: int, ep: Endpoint) -> None:
        """Endpoint table listener: a new pod starts with its kind's current correction."""
        old = self.group_of[slot]
        if old is not None:
            self._groups[old].slots.discard(slot)
            self.group_of[slot] = None
        if what != "add":
            self.ttft_a[slot], self.ttft_b[slot], self.tpot_a[slot], self.tpot_b[slot] = 0.0, 1.0, 0.0, 1.0
            return
        k = self.key(ep)
        g = self._groups.get(k)
        if g is None:
            g = self._groups[k] = _Group(_Series(self.window), _Series(self.window, mape=True))
        g.slots.add(slot)
        self.group_of[slot] = k
        self._apply(g, "ttft")
        self._apply(g, "tpot")

    def observe(self, slot: int, kind: str, raw: float, observed: float) -> None:
        """One finished request's raw prediction and observed value (seconds) on the pod at ``slot``. The
        fit is redone on every observation while a kind has few, then every ``refit_every`` (a robust refit of
        a 64-point window costs ~0.09 ms CPU, the former least-squares one ~0.03 ms: ~20 us per observation;
        a correction that lags a few requests loses nothing)."""
        k = self.group_of[slot] if 0 <= slot < len(self.group_of) else None
        if k is None or not (raw > 0.0 and observed > 0.0 and math.isfinite(raw) and math.isfinite(observed)):
            return
        g = self._groups[k]
        series = g.ttft if kind == "ttft" else g.tpot
        series.add(raw, observed)
        if series.n <= 2 * self.min_fit or series.n % self.refit_every == 0:
            self._apply(g, kind)

    def _apply(self, g: _Group, kind: str) -> None:
        a, b = (g.ttft if kind == "ttft" else g.tpot).fit(self.min_fit)
        idx = np.fromiter(g.slots, dtype=np.int64, count=len(g.slots))
        if kind == "ttft":
            self.ttft_a[idx], self.ttft_b[idx] = a, b
        else:
            self.tpot_a[idx], self.tpot_b[idx] = a, b

    def coefficients(self, key: GroupKey) -> dict[str, float]:
        """The current (a, b) of one kind of pod, for explanations and tests."""
        g = self._groups.get(key)
        if g is None:
            return {"ttft_a": 0.0, "ttft_b": 1.0, "tpot_a": 0.0, "tpot_b": 1.0}
        ta, tb = g.ttft.fit(self.min_fit)
        pa, pb = g.tpot.fit(self.min_fit)
        return {"ttft_a": ta, "ttft_b": tb, "tpot_a": pa, "tpot_b": pb}


__all__ = ["GroupKey", "OnlineCorrection"]
