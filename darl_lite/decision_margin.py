"""How close a grade decision is to flipping: the urgency of per-pair routing, and a list's head.

A second opinion (the teacher) can only change a grade near its decision boundary, so per-pair
routing sends the pairs whose *corrected* decision (the student's logits plus its population's
grade-prior correction, :meth:`darl_lite.shift_routing.ShiftRouting.decision_logits`) has the
smallest margin. The threshold is fitted on dev pairs, for a share of them
(:func:`margin_threshold_for_rate`), and stored with the margins at every share
(:func:`margin_quantiles`), so a node whose window budget affords another share asks for that.
A shifted list sends its head, the pairs the student ranks highest (:func:`list_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError


def list_heads(
    queries: Sequence[str], relevance: NDArray[np.floating], top_k: int | None
) -> NDArray[np.bool_]:
    """Per pair: whether it is among its query's ``top_k`` pairs of highest ``relevance`` (ties:
    input order; None: every pair): the head of a shifted list that goes to the teacher."""
    head = np.zeros(len(queries), bool)
    rows_of: dict[str, list[int]] = {}
    for i, query in enumerate(queries):
        rows_of.setdefault(query, []).append(i)
    score = np.asarray(relevance, np.float64)
    for rows in rows_of.values():
        index = np.asarray(rows, np.intp)
        if top_k is not None and len(index) > top_k:
            index = index[np.argsort(-score[index], kind="stable")[:top_k]]
        head[index] = True
    return head


def decision_margins(decision_logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """Per row, the largest value minus the second largest: how far a grade decision is from flipping."""
    values = np.asarray(decision_logits, np.float64)
    if not len(values):
        return np.zeros(0)
    top2 = np.partition(values, -2, axis=1)[:, -2:]
    margins: NDArray[np.float64] = top2[:, 1] - top2[:, 0]
    return margins


#: The shares at which :func:`margin_quantiles` records in-distribution dev margins.
QUANTILE_SHARES: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 101), 2).tolist())


def margin_quantiles(decision_logits: NDArray[np.floating]) -> tuple[tuple[float, float], ...]:
    """``(share, margin)`` at each of :data:`QUANTILE_SHARES`: the margin below which that share of
    these (dev) pairs' decision margins lie."""
    margins = decision_margins(decision_logits)
    if not len(margins):
        raise InputError("margin_quantiles needs at least one dev pair")
    values = np.quantile(margins, QUANTILE_SHARES)
    values[1:] += 1e-9  # a share > 0 asks for at least the pairs at its quantile
    return tuple((float(r), float(m)) for r, m in zip(QUANTILE_SHARES, values, strict=True))


def margin_threshold_for_rate(decision_logits: NDArray[np.floating], rate: float) -> float:
    """The ``pair_margin_threshold`` that makes a share ``rate`` of these (dev) pairs candidates.

    Fit it on dev pairs' corrected logits, never test data."""
    if not 0.0 < rate <= 1.0:
        raise InputError(f"rate must lie in (0, 1], got {rate}")
    margins = decision_margins(decision_logits)
    if not len(margins):
        raise InputError("margin_threshold_for_rate needs at least one dev pair")
    return float(np.quantile(margins, rate, method="lower") + 1e-9)


__all__ = [
    "QUANTILE_SHARES",
    "decision_margins",
    "list_heads",
    "margin_quantiles",
    "margin_threshold_for_rate",
]
