"""Softmax and temperature scaling: one scalar that makes grade probabilities as confident as they
are right.

The one home of :func:`softmax` for the runtime (the scorer), the training side (stage reports) and
the export (parity, sensitivity sweep, calibration); numpy only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError


def softmax(logits: NDArray[np.floating], temperature: float = 1.0) -> NDArray[np.float64]:
    """Row-wise ``softmax(logits / temperature)`` in float64, stable (each row's max subtracted)."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    result: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return result


def log_probabilities(probabilities: NDArray[np.floating]) -> NDArray[np.float64]:
    """``log p`` in float64, with zeros floored at 1e-12 so a grader's hard 0 stays finite."""
    result: NDArray[np.float64] = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, None))
    return result


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
