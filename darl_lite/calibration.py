"""Temperature scaling: one scalar that makes grade probabilities as confident as they are right.

Shared by the export (the student's bundle) and the LLM teacher's probe; numpy only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError
from darl_lite.scorer import softmax


def fit_temperature(logits: NDArray[np.floating], grades: NDArray[np.integer]) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T).

    A one-dimensional problem: golden-section search over log T in [log 0.05, log 20].
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(grades)
    if len(z) == 0:
        raise InputError("cannot fit a temperature on zero labelled pairs")

    def nll(log_t: float) -> float:
        p = softmax(z, float(np.exp(log_t)))
        return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))
