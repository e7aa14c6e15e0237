"""First pick at random with probability proportional to the total score; fallbacks by score."""

import random

import numpy as np

from pickers.framework import Param, Picker, register


@register
class WeightedRandomPicker(Picker):
    TYPE = "weighted-random"
    PARAMS = {**Picker.PARAMS, "seed": Param((int, type(None)), None)}

    def __init__(self, **params):
        super().__init__(**params)
        self._rng = np.random.default_rng(self.seed if self.seed is not None else random.getrandbits(64))

    def pick(self, ctx, cands, totals):
        w = np.maximum(totals, 0.0) + 1e-9
        first = int(self._rng.choice(cands.size, p=w / w.sum()))
        rest = [i for i in np.argsort(-totals, kind="stable").tolist() if i != first]
        return np.asarray([first] + rest[: self.max_endpoints - 1], dtype=np.intp)
