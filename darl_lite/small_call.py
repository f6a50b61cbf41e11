"""A small call's routing plan and result objects on plain Python floats, without numpy.

Right after onnxruntime's run the interpreter's and numpy's working set is evicted, and each numpy
call on a tiny array costs several times its idle price. For a one-pair call, :func:`plan_call`
and the result objects took about 400 µs that way, against about 75 µs for the same arithmetic on
Python floats (docs/benchmarks.md, "Eleventh session"): a tenth of the call. So a call of at most
:data:`SMALL_CALL_PAIRS` pairs is planned here, row by row.

:func:`plan_rows` makes the plan :func:`darl_lite.cascade.plan_call` makes: the same decisions,
notes and budget draws, and probabilities and urgencies equal up to rounding (numpy may sum or
exponentiate in another order). ``tests/test_small_call.py`` compares the two on random calls. A call
this module does not cover returns None *before* any budget is drawn, and takes the array path: a
query of a kind that routes whole lists, a non-finite model output, a population whose grade-prior
correction has the wrong width (the array path names it), an OOD threshold of 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from darl_lite.budget import RouteBudget
from darl_lite.cascade import NOTE_CALL_BUDGET, NOTE_WINDOW_BUDGET, CallPlan
from darl_lite.routing import RoutingPolicy
from darl_lite.shift_routing import ShiftRouting

#: The largest call planned row by row. Measured right after a run, 1 thread (docs/benchmarks.md,
#: "Eleventh session"): row by row took 176 / 352 / 482 µs at 1 / 10 / 16 pairs against the arrays'
#: 471 / 585 / 663 µs; at 32 pairs the gain (about 0.1 ms) is under 0.2% of the call.
SMALL_CALL_PAIRS = 16

#: The note of a pair routing sent where the scorer has no fallback.
NOTE_NO_FALLBACK = "no fallback configured: student answer kept"


@dataclass(frozen=True)
class RowPlan:
    """:class:`~darl_lite.cascade.CallPlan` as Python lists, one entry per pair."""

    student: list[list[float]]  # calibrated student probabilities
    grades: list[int]
    candidate: list[bool]
    routed: list[bool]
    urgency: list[float]
    query_shift: list[float]
    population: list[int]
    notes: list[str]

    def to_call_plan(self) -> CallPlan:
        """The array form, for the fallback's answer (a routed pair with a fallback to ask)."""
        n = len(self.grades)
        return CallPlan(
            student=np.asarray(self.student, np.float64).reshape(n, -1),
            grades=np.asarray(self.grades, np.intp),
            candidate=np.asarray(self.candidate, bool),
            routed=np.asarray(self.routed, bool),
            list_routed=np.zeros(n, bool),
            urgency=np.asarray(self.urgency, np.float64),
            query_shift=np.asarray(self.query_shift, np.float64),
            notes=list(self.notes),
            population=np.asarray(self.population, np.intp),
        )


def plan_rows(
    logits: Sequence[Sequence[float]],
    ood_scores: Sequence[float],
    queries: Sequence[str],
    *,
    temperature: float,
    policy: RoutingPolicy,
    shift: ShiftRouting | None = None,
    budget: RouteBudget | None = None,
) -> RowPlan | None:
    """:func:`darl_lite.cascade.plan_call` on Python lists (``logits.tolist()`` and so on), or None
    for a call it does not cover (see the module docstring); None draws nothing from ``budget``."""
    n = len(queries)
    if (
        not n
        or not all(map(math.isfinite, ood_scores))
        or not all(math.isfinite(v) for row in logits for v in row)
    ):
        return None
    if policy.rule != "expected_error" and policy.ood_threshold == 0.0:
        return None
    student = [_softmax(row, temperature) for row in logits]
    decision: Sequence[Sequence[float]] = logits
    allowed, urgency = [True] * n, None
    if shift is None:
        population, query_shift = [-1] * n, [0.0] * n
    else:
        found: dict[str, tuple[int, float]] = {}
        for query in queries:
            if query not in found:
                found[query] = shift.assign_query(query)
        population = [found[q][0] for q in queries]
        query_shift = [found[q][1] for q in queries]
        kinds = shift.kinds
        if any(k >= 0 and kinds[k].route_lists for k in population):
            return None
        biases = [k.logit_bias for k in kinds] + [shift.in_distribution_bias]
        corrected = _corrected(logits, population, biases)
        if corrected is None:
            return None
        decision = corrected
        allowed = [k < 0 or kinds[k].route_pairs for k in population]
        share = budget.pair_share(shift.reserve_pairs) if budget is not None else None
        threshold = shift.margin_threshold(share)
        if threshold is not None:
            urgency = [threshold - _margin(row) for row in decision]
    grades = [row.index(max(row)) for row in decision]  # the first largest, as argmax
    if urgency is None:
        urgency = _policy_urgency(policy, student, ood_scores)
    candidate = [u > 0.0 and a for u, a in zip(urgency, allowed, strict=True)]
    cap = math.floor(policy.max_route_fraction * n + 1e-9)
    pairs = _most_urgent(urgency, candidate, cap) if sum(candidate) > cap else candidate
    notes = [NOTE_CALL_BUDGET if c and not p else "" for c, p in zip(candidate, pairs, strict=True)]
    if budget is not None:
        wanted = sum(pairs)
        reserve = shift.reserve_pairs if shift is not None else 0
        granted = budget.acquire(n, wanted, reserve=reserve)
        if granted < wanted:
            kept = _most_urgent(urgency, pairs, granted)
            for i in range(n):
                if pairs[i] and not kept[i]:
                    notes[i] = NOTE_WINDOW_BUDGET
            pairs = kept
    return RowPlan(student, grades, candidate, pairs, urgency, query_shift, population, notes)


def _softmax(row: Sequence[float], temperature: float) -> list[float]:
    z = [v / temperature for v in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def _margin(row: Sequence[float]) -> float:
    """The largest value minus the second largest (:func:`darl_lite.decision_margin.decision_margins`)."""
    top2 = sorted(row)[-2:]
    return top2[1] - top2[0]


def _corrected(
    logits: Sequence[Sequence[float]], population: list[int], biases: list[tuple[float, ...] | None]
) -> Sequence[Sequence[float]] | None:
    """Each row plus its population's grade-prior correction (the last bias: population -1); None
    when a present population's correction has the wrong width. Uncorrected rows are not copied."""
    if all(b is None for b in biases):
        return logits
    width = len(logits[0])
    out: list[Sequence[float]] = []
    for row, k in zip(logits, population, strict=True):
        bias = biases[k]
        if bias is None:
            out.append(row)
        elif len(bias) != width:
            return None
        else:
            out.append([v + b for v, b in zip(row, bias, strict=True)])
    return out


def _policy_urgency(
    policy: RoutingPolicy, student: list[list[float]], ood_scores: Sequence[float]
) -> list[float]:
    """:meth:`darl_lite.routing.RoutingPolicy.urgency`, row by row."""
    if policy.rule == "expected_error":
        return [(1.0 - max(p)) - policy.error_threshold for p in student]
    scale = max(policy.margin_threshold, 1e-12)
    scores = [(policy.margin_threshold - _margin(p)) / scale for p in student]
    if math.isfinite(policy.ood_threshold):
        scores = [max(s, o / policy.ood_threshold - 1.0) for s, o in zip(scores, ood_scores, strict=True)]
    return scores


def _most_urgent(urgency: list[float], allowed: list[bool], k: int) -> list[bool]:
    """:func:`darl_lite.routing.most_urgent`: the ``k`` most urgent allowed pairs (ties: input order)."""
    order = sorted((i for i, a in enumerate(allowed) if a), key=lambda i: -urgency[i])
    keep = set(order[: max(0, k)])
    return [i in keep for i in range(len(allowed))]


__all__ = ["NOTE_NO_FALLBACK", "SMALL_CALL_PAIRS", "RowPlan", "plan_rows"]
