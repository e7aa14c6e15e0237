"""Round robin over the candidates in slot order; the following ones are the fallback list."""

import numpy as np

from pickers.framework import Picker, register


@register
class RoundRobinPicker(Picker):
    TYPE = "round-robin"

    def __init__(self, **params):
        super().__init__(**params)
        self._next = 0

    def pick(self, ctx, cands, totals):
        n = cands.size
        start = self._next % n
        self._next += 1
        order = np.argsort(cands, kind="stable")
        return np.roll(order, -start)[: self.max_endpoints]
