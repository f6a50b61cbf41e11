"""Quality against route rate: what sending the top share of pairs to the LLM buys, and what a
random choice of the same size buys (the control that shows whether the router earns its place)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.metrics import grading_report
from darl_lite.types import GRADE_GAINS

DEFAULT_RATES: tuple[float, ...] = (0.0, 0.05, 0.10, 0.20, 0.30)


def route_curve(
    student_probs: NDArray[np.floating],
    llm_probs: NDArray[np.floating],
    urgency: NDArray[np.floating],
    grades: NDArray[np.integer],
    query_ids: Sequence[str],
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    seed: int = 0,
    gains: Sequence[float] = GRADE_GAINS,
) -> list[dict[str, Any]]:
    """For each rate r: metrics when the ``r·N`` most urgent pairs take the LLM's answer, and when
    ``r·N`` pairs chosen at random do."""
    student = np.asarray(student_probs, np.float64)
    llm = np.asarray(llm_probs, np.float64)
    n = len(student)
    by_urgency = np.argsort(-np.asarray(urgency, np.float64), kind="stable")
    shuffled = np.random.default_rng(seed).permutation(n)
    rows = []
    for rate in rates:
        k = round(rate * n)
        row: dict[str, Any] = {"route_rate": k / n if n else 0.0}
        for name, order in (("router", by_urgency), ("random", shuffled)):
            mixed = student.copy()
            mixed[order[:k]] = llm[order[:k]]
            row[name] = grading_report(mixed, np.asarray(grades), list(query_ids), gains=gains)
        rows.append(row)
    return rows
