"""Highest total first; ties broken at random; the next best form the fallback list."""

import random

import numpy as np

from pickers.framework import Param, Picker, register


@register
class MaxScorePicker(Picker):
    TYPE = "max-score"
    PARAMS = {**Picker.PARAMS, "seed": Param((int, type(None)), None)}

    def __init__(self, **params):
        super().__init__(**params)
        self._rng = np.random.default_rng(self.seed if self.seed is not None else random.getrandbits(64))

    def pick(self, ctx, cands, totals):
        k = min(self.max_endpoints, cands.size)
        t = np.round(totals, 9)
        order = np.lexsort((self._rng.random(cands.size), -t))
        return order[:k]
