"""Uniform random order (the baseline)."""

import random

import numpy as np

from pickers.framework import Param, Picker, register


@register
class RandomPicker(Picker):
    TYPE = "random"
    PARAMS = {**Picker.PARAMS, "seed": Param((int, type(None)), None)}

    def __init__(self, **params):
        super().__init__(**params)
        self._rng = np.random.default_rng(self.seed if self.seed is not None else random.getrandbits(64))

    def pick(self, ctx, cands, totals):
        return self._rng.permutation(cands.size)[: self.max_endpoints]
