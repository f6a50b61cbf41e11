"""Quality against route rate: what sending the top share of pairs to the LLM buys, and what a
random choice of the same size buys (the control that shows whether the router earns its place)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError
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
    random_repeats: int = 1,
) -> list[dict[str, Any]]:
    """For each rate r: metrics when the ``r·N`` most urgent pairs take the LLM's answer, and when
    ``r·N`` pairs chosen at random do (averaged over ``random_repeats`` draws, seeds ``seed``,
    ``seed + 1``, …: one draw is noisy enough on a few thousand pairs to decide a comparison)."""
    if random_repeats < 1:
        raise InputError(f"random_repeats must be >= 1, got {random_repeats}")
    student = np.asarray(student_probs, np.float64)
    llm = np.asarray(llm_probs, np.float64)
    n = len(student)
    by_urgency = np.argsort(-np.asarray(urgency, np.float64), kind="stable")
    draws = [np.random.default_rng(seed + r).permutation(n) for r in range(random_repeats)]
    qids = list(query_ids)

    def report(order: NDArray[np.intp], k: int) -> dict[str, float]:
        mixed = student.copy()
        mixed[order[:k]] = llm[order[:k]]
        return grading_report(mixed, np.asarray(grades), qids, gains=gains)

    rows = []
    for rate in rates:
        k = round(rate * n)
        randoms = [report(order, k) for order in draws]
        rows.append(
            {
                "route_rate": k / n if n else 0.0,
                "router": report(by_urgency, k),
                "random": {key: float(np.mean([r[key] for r in randoms])) for key in randoms[0]},
            }
        )
    return rows


def curve_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """:func:`route_curve` rows as aligned text lines: route rate, router and random quality."""
    lines = [
        f"{'route rate':>10}  {'router F1':>9}  {'random F1':>9}  {'router NDCG@10':>14}  "
        f"{'random NDCG@10':>14}"
    ]
    for row in rows:
        router, rand = row["router"], row["random"]
        lines.append(
            f"{row['route_rate']:>10.1%}  {router['macro_f1']:>9.3f}  {rand['macro_f1']:>9.3f}  "
            f"{router['ndcg@10']:>14.3f}  {rand['ndcg@10']:>14.3f}"
        )
    return lines
