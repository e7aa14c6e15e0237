"""Shared normalisation: lower is better -> [0, 1] by min-max over the candidates (all equal -> 1)."""

import numpy as np


def lower_is_better(x: np.ndarray) -> np.ndarray:
    lo = x.min()
    span = x.max() - lo
    if span <= 0:
        return np.ones(x.size)
    return (x.max() - x) / span
