"""Quality against route rate: what sending the top share of pairs to the LLM buys, and what a
random choice of the same size buys (the control that shows whether the router earns its place)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import softmax
from darl_lite.errors import InputError
from darl_lite.metrics import grading_report
from darl_lite.routing import RoutingPolicy
from darl_lite.shift_routing import ShiftRouting, row_argmax
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
    student_grades: NDArray[np.integer] | None = None,
    llm_grades: NDArray[np.integer] | None = None,
    llm_ranks: bool = True,
) -> list[dict[str, Any]]:
    """For each rate r: metrics when the ``r·N`` most urgent pairs take the LLM's answer, and when
    ``r·N`` pairs chosen at random do (averaged over ``random_repeats`` draws, seeds ``seed``,
    ``seed + 1``, …: one draw is noisy enough on a few thousand pairs to decide a comparison).

    Grade decisions are each side's argmax unless ``student_grades`` / ``llm_grades`` give them (a
    node's corrected decisions); with ``llm_ranks`` False a routed pair keeps the student's
    probabilities for the ranking, as a pair routed on its own does on a node with shift routing."""
    if random_repeats < 1:
        raise InputError(f"random_repeats must be >= 1, got {random_repeats}")
    student = np.asarray(student_probs, np.float64)
    llm = np.asarray(llm_probs, np.float64)
    n = len(student)
    by_urgency = np.argsort(-np.asarray(urgency, np.float64), kind="stable")
    draws = [np.random.default_rng(seed + r).permutation(n) for r in range(random_repeats)]
    qids = list(query_ids)
    decided = student.argmax(axis=1) if student_grades is None else np.asarray(student_grades)
    answered = llm.argmax(axis=1) if llm_grades is None else np.asarray(llm_grades)
    if decided.shape != (n,) or answered.shape != (len(llm),):
        raise InputError(
            f"grade decisions of shapes {decided.shape} and {answered.shape} for {n} student and "
            f"{len(llm)} LLM rows"
        )

    def report(order: NDArray[np.intp], k: int) -> dict[str, float]:
        mixed = student.copy()
        if llm_ranks:
            mixed[order[:k]] = llm[order[:k]]
        grades_out = decided.copy()
        grades_out[order[:k]] = answered[order[:k]]
        return grading_report(mixed, np.asarray(grades), qids, gains=gains, decided=grades_out)

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


def node_route_curve(
    logits: NDArray[np.floating],
    ood_scores: NDArray[np.floating],
    llm_probs: NDArray[np.floating],
    grades: NDArray[np.integer],
    queries: Sequence[str],
    *,
    temperature: float,
    policy: RoutingPolicy,
    shift: ShiftRouting | None,
    query_ids: Sequence[str] | None = None,
    rates: Sequence[float] = DEFAULT_RATES,
    seed: int = 0,
    gains: Sequence[float] = GRADE_GAINS,
    random_repeats: int = 1,
) -> list[dict[str, Any]]:
    """:func:`route_curve` for pairs routed one by one as a node with this routing routes them.

    With shift routing, decisions on both sides are the node's corrected ones, a routed pair keeps
    the student's probabilities for the ranking, and pairs rank by the corrected decision margin
    (closest to flipping first) where the bundle has a margin threshold, by ``policy``'s urgency
    otherwise; pairs of a kind that routes no single pairs come last. Without it, ``policy``'s
    urgency ranks the pairs and each side's argmax grades them. ``query_ids`` (default
    ``queries``) group pairs for NDCG@10."""
    student = softmax(np.asarray(logits, np.float64), temperature)
    llm = np.asarray(llm_probs, np.float64)
    qids = list(queries) if query_ids is None else list(query_ids)
    common: dict[str, Any] = {"rates": rates, "seed": seed, "gains": gains, "random_repeats": random_repeats}
    if shift is None:
        urgency = policy.urgency(student, np.asarray(ood_scores, np.float64))
        return route_curve(student, llm, urgency, grades, qids, **common)
    assignment = shift.assign(queries)
    decision_logits = shift.decision_logits(logits, assignment.kind)
    ranked = shift.margin_urgency(decision_logits)
    if ranked is None:  # an older bundle without a margin threshold: the policy's urgency
        ranked = policy.urgency(student, np.asarray(ood_scores, np.float64))
    urgency = np.where(shift.pair_routing_allowed(assignment), ranked, -np.inf)
    _, answered = shift.fallback_answer(student, llm, assignment.kind)
    return route_curve(
        student,
        llm,
        urgency,
        grades,
        qids,
        student_grades=row_argmax(decision_logits),
        llm_grades=answered,
        llm_ranks=False,
        **common,
    )


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
