"""The one cost model (engine.costmodel) laid out per endpoint slot, for the predictor and the scorers.

Each pod's model x accelerator x deployment becomes a ``Roofline`` (the numbers ``step_seconds`` needs) in
a ``RooflineTable``; the predictor evaluates the very formula the simulator charges, vectorised over
candidates (engine.costmodel.vector), never a fitted approximation of it. Beside it, per slot: the pod's
step token budget (vLLM ``max_num_batched_tokens``: the endpoint's own value, else its role's preset, as the
pod would be deployed by engine.presets), its sequence slots (``max_num_seqs``, the same way), its KV capacity
in tokens, and the cost of an empty step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import TypeVar, cast

import numpy as np

from engine.costmodel import CostModel, Roofline
from engine.costmodel.dataparallel import rank_cost_model
from engine.costmodel.vector import RooflineTable
from engine.costmodel.vector import warm_up as warm_up_vector
from engine.presets import preset
from pickers.types import Endpoint

T = TypeVar("T")
MAX_DERIVED = 64


@lru_cache(maxsize=256)
def cost_model(model_profile: str, accelerator: str) -> CostModel:
    """The cost model of a pod (raises ValueError for an unknown model profile or accelerator)."""
    return CostModel(model_profile, accelerator)


@lru_cache(maxsize=256)
def preset_budget(model_profile: str, accelerator: str, role: str) -> int:
    """max_num_batched_tokens of the preset a pod of this kind is deployed with."""
    return preset(model_profile, accelerator, role).max_num_batched_tokens


@lru_cache(maxsize=256)
def preset_max_seqs(model_profile: str, accelerator: str, role: str) -> int:
    """max_num_seqs of the preset a pod of this kind is deployed with."""
    return preset(model_profile, accelerator, role).max_num_seqs


class CostTable:
    """Per endpoint slot: the pod's roofline, step token budget, sequence slots, KV capacity and empty-step
    cost."""

    def __init__(self, max_endpoints: int = 1024) -> None:
        n = max_endpoints
        warm_up_vector()  # the predictor's compiled prefill kernel, loaded before the first decision
        self.roofline = RooflineTable(n)
        self.budget = np.full(n, 8192.0)
        self.max_seqs = np.full(n, 256.0)  # vLLM max_num_seqs: running sequences at most (pickers/slotwait.py)
        self.kv_capacity = np.full(n, 1e6)
        self.empty_step_s = np.full(n, 1e-3)  # one token, nothing cached: the floor every step pays
        self._version = 0
        self._memo: dict[int, tuple[np.ndarray, int, Roofline]] = {}  # copies -> (slots, version, rooflines)
        self._derived: dict[Hashable, tuple[int, object]] = {}  # key -> (version, value): see derived

    @property
    def version(self) -> int:
        """Changes whenever a slot's cost model, budget, sequence slots or capacity is set (memo key for
        derived values)."""
        return self._version

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """A value computed from the table (``build()``), kept until the table changes: per-slot constants of
        the pods' kinds that a decision would otherwise recompute (e.g. KV transfer coefficients). At most
        ``MAX_DERIVED`` keys are kept."""
        got = self._derived.get(key)
        if got is not None and got[0] == self._version:
            return cast("T", got[1])
        v = build()
        if len(self._derived) >= MAX_DERIVED and key not in self._derived:
            self._derived.clear()
        self._derived[key] = (self._version, v)
        return v

    def rooflines(self, slots: np.ndarray, copies: int = 1) -> Roofline:
        """The rooflines of ``slots`` (repeated ``copies`` times, for stacked evaluations). Memoised for the
        same ``slots`` array object: the endpoint table hands out one cached array while the fleet is
        unchanged, so a decision normally costs no gather at all."""
        got = self._memo.get(copies)
        if got is not None and got[0] is slots and got[1] == self._version:
            return got[2]
        r = self.roofline.gather(np.tile(slots, copies) if copies > 1 else slots)
        self._memo[copies] = (slots, self._version, r)
        return r

    def set(self, slot: int, endpoint: Endpoint) -> None:
        if endpoint.dp_rank is not None and (endpoint.dp_size or 1) > 1:  # one data-parallel rank of a pod
            cm = rank_cost_model(endpoint.model_profile, endpoint.accelerator, int(endpoint.dp_size or 1))
        else:
            cm = cost_model(endpoint.model_profile, endpoint.accelerator)
        self.roofline.set(slot, cm.roofline)
        self.budget[slot] = float(endpoint.max_num_batched_tokens
                                  or preset_budget(endpoint.model_profile, endpoint.accelerator, endpoint.role.value))
        self.max_seqs[slot] = float(endpoint.max_num_seqs
                                    or preset_max_seqs(endpoint.model_profile, endpoint.accelerator,
                                                       endpoint.role.value))
        self.kv_capacity[slot] = float(cm.kv_capacity_tokens)
        self.empty_step_s[slot] = cm.step_time(1, 1.0, 0.0)
        self._version += 1
