"""What routing a kind's lists would gain: which head of a list to route, its gains, and the rule.

A shifted list sends its head (the student's top K pairs) to the teacher; the evidence compares
the list answered that way with the corrected student on graded dev pairs of the kind, for both
jobs a grader does (per-query NDCG@10 and macro-F1, with one bootstrap over queries), and then
per-pair routing of the pairs outside the head on top of it. :func:`lists_pay` turns the record
into the decision. Fitting the rest of a kind (detector, corrections) is
:mod:`darl_lite.cascade_fit`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import softmax
from darl_lite.decision_margin import list_heads
from darl_lite.gain_evidence import GradedEvidence, bootstrap_gains, graded_report, per_query_ndcg
from darl_lite.metrics import macro_f1

#: Heads of a shifted list (pairs, in the student's ranking) :func:`choose_list_top_k` considers.
TOP_K_GRID: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 80, 100)
#: A head keeps the whole list's ranking gain when its mean NDCG@10 gain is at most this much lower.
TOP_K_TOLERANCE = 0.005


def choose_list_top_k(
    ev: GradedEvidence,
    grid: Sequence[int] = TOP_K_GRID,
    tolerance: float = TOP_K_TOLERANCE,
) -> tuple[int | None, dict[str, float]]:
    """The routed head of a kind's lists: the smallest ``K`` of ``grid`` whose mean per-query
    NDCG@10 gain (the head answered as a routed pair is, the rest by the student) is within
    ``tolerance`` of the whole list's; None (the whole list) when none is, or when no list is longer
    than ``K``. Also every K's mean gain, for the record.

    Reranking the cheap model's top candidates with the expensive one is the classic cascade: the
    ranking gain lives at the top of the list. Measured on the shipped ood_dev (17 queries of 55–374
    pairs), the student's top 50 kept the whole list's gain (+0.048 of +0.048) at 46% of its pairs;
    the top 30 kept +0.021. The budget a list's tail would have cost goes to per-pair routing.
    """
    student = softmax(ev.student_logits, ev.temperature)
    answer = ev.answer()
    relevance = student @ np.asarray(ev.gains, np.float64)
    base = per_query_ndcg(student, ev.grades, ev.queries, ev.gains)

    def mean_gain(head: NDArray[np.bool_]) -> float:
        ndcg = per_query_ndcg(np.where(head[:, None], answer, student), ev.grades, ev.queries, ev.gains)
        return float(np.mean([ndcg[q] - base[q] for q in base]))

    whole = mean_gain(np.ones(len(ev.queries), bool))
    scores = {"whole": round(whole, 4)}
    longest = max(Counter(ev.queries).values(), default=0)
    chosen: int | None = None
    for k in sorted(grid):
        if k >= longest:
            break
        gain = mean_gain(list_heads(ev.queries, relevance, k))
        scores[str(k)] = round(gain, 4)
        if chosen is None and gain >= whole - tolerance:
            chosen = k
    return chosen, scores


def lists_pay(record: Mapping[str, Any]) -> bool:
    """Whether a kind's lists go to the teacher, from its gain evidence (:func:`list_gain_evidence`).

    By expected gain over both jobs a grader does: a gain must be established — the 90% interval
    of the NDCG@10 gain, of the macro-F1 gain, or of their sum (one bootstrap over queries for all
    three) lies above zero — and neither job's mean gain may be negative. Judging ranking alone
    would ignore grading, half of what a routed pair is for; on a few dozen queries each job's
    interval alone rarely clears zero even where both gains are real, while their sum, resampled
    together, often does; and where one job's gain is clear and the other's is a noisy zero, the sum
    inherits that noise and may not clear zero though the clear gain does. Measured on ood_dev (17
    queries) for the same student exported twice (AVX-512 VNNI static and AVX2 dynamic int8): the
    macro-F1 interval was [+0.015, +0.201] and [+0.015, +0.199], the sum's [+0.022, +0.309] and
    [−0.021, +0.270] — the sum alone flipped the decision between two equally valid graphs. A mean
    gain alone would route on noise.
    """
    established = any(
        record.get(key) is not None and record[key][0] > 0.0
        for key in ("combined_gain_ci90", "macro_f1_gain_ci90", "ndcg_gain_ci90")
    )
    return bool(established and record["ndcg_gain"] >= 0.0 and record["macro_f1_gain"] >= 0.0)


def list_gain_evidence(
    ev: GradedEvidence,
    decided: NDArray[np.intp],
    teacher_decided: NDArray[np.intp],
    urgency: NDArray[np.float64],
    top_k: int | None,
    seed: int,
) -> dict[str, Any]:
    """A routed list minus the student on these pairs: per query NDCG@10 (with an interval) and
    macro-F1; then per-pair routing of the pairs outside the list's head on top of it.

    A list answers its head (its ``top_k`` pairs the student ranks highest; None: every pair) as a
    routed pair is, the rest by the student. Each ranks by its probabilities and grades by its
    prior-corrected decisions (``decided``, ``teacher_decided``, cross-fitted); per-pair routing
    sends the pairs outside the head with ``urgency`` > 0.
    """
    student, routed_answer = softmax(ev.student_logits, ev.temperature), ev.answer()
    queries = list(ev.queries)
    head = list_heads(queries, student @ np.asarray(ev.gains, np.float64), top_k)
    answer = np.where(head[:, None], routed_answer, student)
    listed_decided = np.where(head, teacher_decided, decided)
    s_ndcg = per_query_ndcg(student, ev.grades, ev.queries, ev.gains)
    t_ndcg = per_query_ndcg(answer, ev.grades, ev.queries, ev.gains)
    s_rep = graded_report(student, decided, ev.grades, queries, ev.gains)
    t_rep = graded_report(answer, listed_decided, ev.grades, queries, ev.gains)
    # per-pair routing on top of the list answer, outside the head (a whole list leaves no pair
    # outside it: then judged on its own, against the student, for lists the budget refuses). A
    # pair routed on its own takes the routed grade and its list keeps its ranking: the gain is
    # in macro-F1 alone, and its NDCG@10 gain is 0 by construction.
    whole = bool(head.all())
    base_decided, base_f1 = (decided, s_rep["macro_f1"]) if whole else (listed_decided, t_rep["macro_f1"])
    routed = (np.ones_like(head) if whole else ~head) & (np.asarray(urgency) > 0.0)
    pair_f1 = macro_f1(ev.grades, np.where(routed, teacher_decided, base_decided), answer.shape[1])
    gains = {q: t_ndcg[q] - s_ndcg[q] for q in s_ndcg}
    ci = bootstrap_gains(gains, ev.grades, decided, listed_decided, queries, answer.shape[1], seed=seed)
    ndcg_gain, f1_gain = float(np.mean(list(gains.values()))), t_rep["macro_f1"] - s_rep["macro_f1"]
    return {
        "pairs": len(ev.queries),
        "student": {k: round(v, 4) for k, v in s_rep.items()},
        "teacher": {k: round(v, 4) for k, v in t_rep.items()},
        "ndcg_gain": round(ndcg_gain, 4),
        "ndcg_gain_ci90": [round(v, 4) for v in ci.ndcg],
        "macro_f1_gain": round(f1_gain, 4),
        "macro_f1_gain_ci90": [round(v, 4) for v in ci.macro_f1],
        "combined_gain": round(ndcg_gain + f1_gain, 4),
        "combined_gain_ci90": [round(v, 4) for v in ci.combined],
        "list_share": round(float(head.mean()), 4),
        "pair_routing_rate": round(float(routed.mean()), 4),
        "pair_routing_macro_f1_gain": round(pair_f1 - base_f1, 4),
        "pair_routing_ndcg_gain": 0.0,
    }


__all__ = ["TOP_K_GRID", "TOP_K_TOLERANCE", "choose_list_top_k", "list_gain_evidence", "lists_pay"]
