"""One call's routing plan: which pairs go to the teacher, decided the same way on a node and in evaluation.

:func:`plan_call` is pure apart from the sliding-window budget it draws on. The scorer runs it on
every call of more than :data:`~darl_lite.small_call.SMALL_CALL_PAIRS` pairs, and its row-by-row
twin :func:`~darl_lite.small_call.plan_rows` (the same plans, tested against this one) on smaller
ones; the mixed-stream evaluation (:mod:`darl_lite.mixed_stream`) runs it on recorded student
outputs, so what is measured is what a node does. The order:

1. each pair's query is assigned a kind of shift (or none); the student's probabilities are its
   logits through the bundle's temperature (they rank a list), and its grade decision adds that
   kind's grade-prior correction to the logits (it moves the grade, never the ranking);
2. **lists**: every query of a kind on which the teacher is expected to win sends the head of its
   list to the teacher (the kind's ``list_top_k`` pairs the student ranks highest, or all of
   them), if the window budget grants the whole head (all or nothing: the head is never a mix of
   two models);
3. **pairs**: of the rest, the pairs routing wants, most urgent first — where the bundle has a
   ``pair_margin_threshold``, the pairs whose corrected grade decision is closest to flipping (with
   a window budget, as many as it can afford in steady state: ``RouteBudget.pair_share``), else
   the routing policy's (the student is likely wrong) — within the per-call cap and what the
   window budget grants beyond the reserve kept for lists and what lists asked for in the window
   (:class:`~darl_lite.budget.RouteBudget`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from darl_lite.budget import RouteBudget
from darl_lite.calibration import softmax
from darl_lite.routing import RoutingPolicy, most_urgent
from darl_lite.shift_routing import QueryAssignment, ShiftRouting, row_argmax

#: Notes of pairs routing wanted but a budget refused.
NOTE_CALL_BUDGET = "routing budget exhausted: student answer kept"
NOTE_WINDOW_BUDGET = "sliding-window routing budget exhausted: student answer kept"
NOTE_LIST_BUDGET = (
    "shifted query: the window budget could not take its list's routed head; student answer kept"
)


@dataclass(frozen=True)
class CallPlan:
    """The routing plan of one call, per pair."""

    student: NDArray[np.float64]  # calibrated student probabilities (they rank a list)
    grades: NDArray[np.intp]  # the student's grade decisions, after its kind's prior correction
    candidate: NDArray[np.bool_]  # routing wanted the teacher (as a list or as a pair)
    routed: NDArray[np.bool_]  # and the budgets allowed it
    list_routed: NDArray[np.bool_]  # routed as part of a shifted list's head
    urgency: NDArray[np.float64]
    query_shift: NDArray[np.float64]  # the query's shift probability (0 without a detector)
    notes: list[str]
    #: each pair's population: the index of its query's kind of shift, -1 for in-distribution
    population: NDArray[np.intp] | None = None

    def fallback_answer(
        self, teacher: NDArray[np.floating], shift: ShiftRouting | None
    ) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
        """The routed pairs' served probabilities and grade decisions (in order) from the
        teacher's rows for them: blended with the student's and corrected per population when the
        bundle has shift routing, the teacher's own answer and argmax otherwise.

        With shift routing, a pair routed on its own (not in a list's routed head) takes its grade
        from that answer but keeps the student's probabilities, which rank its list: one model
        ranks each list. Per-pair routing picks pairs by how close their grade is to flipping, and
        mixing two models' scales inside a list cost ranking (on the shipped id_test, blending the
        10% of pairs nearest their boundary moved NDCG@10 from 0.479 to 0.475 while it raised it on
        dev): the grade is what a second opinion on a lone pair is for."""
        if shift is None or self.population is None:
            answer = np.asarray(teacher, np.float64)
            return answer, answer.argmax(axis=1) if len(answer) else np.zeros(0, np.intp)
        student = self.student[self.routed]
        answer, grades = shift.fallback_answer(student, teacher, self.population[self.routed])
        alone = ~self.list_routed[self.routed]
        if alone.any():
            answer = np.array(answer, np.float64)  # never the caller's teacher rows
            answer[alone] = student[alone]
        return answer, grades


def plan_call(
    logits: NDArray[np.floating],
    ood_scores: NDArray[np.floating],
    queries: Sequence[str],
    *,
    temperature: float,
    policy: RoutingPolicy,
    shift: ShiftRouting | None = None,
    budget: RouteBudget | None = None,
    gains: Sequence[float] | NDArray[np.floating] | None = None,
) -> CallPlan:
    """Plan one call (see the module docstring); draws on ``budget`` once per list and once for pairs.

    ``gains`` (the bundle's grade gains; default 0, 1, 2, ...) turn the student's probabilities into
    the expected relevance that picks a list's head."""
    n = len(queries)
    notes = [""] * n
    student = softmax(logits, temperature)
    if shift is None:
        assignment = QueryAssignment(np.full(n, -1, np.intp), np.zeros(n))
        grades = row_argmax(logits)
        lists, allowed, urgency = np.zeros(n, bool), np.ones(n, bool), None
    else:
        assignment = shift.assign(queries)
        decision_logits = shift.decision_logits(logits, assignment.kind)  # once: grades and urgency
        grades = row_argmax(decision_logits)
        weights = (
            np.arange(student.shape[1], dtype=np.float64) if gains is None else np.asarray(gains, np.float64)
        )
        lists = shift.list_candidates(assignment, queries, student, weights)
        allowed = ~lists & shift.pair_routing_allowed(assignment)
        share = budget.pair_share(shift.reserve_pairs) if budget is not None else None
        urgency = shift.margin_urgency(decision_logits, share)
    list_routed = _route_lists(queries, lists, budget, notes)
    decision = policy.decide(student, np.asarray(ood_scores, np.float64), allowed, urgency=urgency)
    pairs = decision.routed
    for i in np.flatnonzero(decision.candidate & ~pairs):
        notes[i] = NOTE_CALL_BUDGET
    if budget is not None:
        rest = int((~lists).sum())
        wanted = int(pairs.sum())
        reserve = shift.reserve_pairs if shift is not None else 0
        granted = budget.acquire(rest, wanted, reserve=reserve)
        if granted < wanted:
            kept = most_urgent(decision.urgency, pairs, granted)
            for i in np.flatnonzero(pairs & ~kept):
                notes[i] = NOTE_WINDOW_BUDGET
            pairs = kept
    return CallPlan(
        student=student,
        grades=grades,
        candidate=lists | decision.candidate,
        routed=list_routed | pairs,
        list_routed=list_routed,
        urgency=decision.urgency,
        query_shift=assignment.probability,
        notes=notes,
        population=assignment.kind,
    )


def _route_lists(
    queries: Sequence[str], lists: NDArray[np.bool_], budget: RouteBudget | None, notes: list[str]
) -> NDArray[np.bool_]:
    routed = np.zeros(len(queries), bool)
    if not lists.any():
        return routed
    q = np.asarray(queries, dtype=object)
    for query in dict.fromkeys(q[lists].tolist()):
        rows = lists & (q == query)
        size = int(rows.sum())
        if budget is None or budget.acquire_list(size):
            routed |= rows
        else:
            for i in np.flatnonzero(rows):
                notes[i] = NOTE_LIST_BUDGET
    return routed


__all__ = ["NOTE_CALL_BUDGET", "NOTE_LIST_BUDGET", "NOTE_WINDOW_BUDGET", "CallPlan", "plan_call"]
