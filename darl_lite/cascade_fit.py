"""Fit a kind of shift from evidence: its detector, the student's prior correction, and whether to route.

One function, :func:`fit_shift_kind`, serves the export (training queries vs the unlabeled
``ood_train`` pool, evidence from dev + ood_dev) and a user's refit (their own graded pairs and the
teacher's grades for them, ``darl-lite refit-routing``). Everything is decided on the graded pairs
given here, never on test data:

1. the domain classifier's L2 strength, by query-level AUROC (in-distribution vs that kind's
   queries) on the graded pairs, or by a held-out split of the fitting queries when the graded pairs
   hold only one side;
2. the student's logit bias on that kind's queries, by macro-F1 on their graded pairs (a small grid,
   the smallest correction within 0.005 of the best); the in-distribution rest gets its own, fitted
   on its own graded pairs (:func:`fit_in_distribution_bias`);
3. ``list_top_k``, the routed head of a list (:func:`choose_list_top_k`): the smallest head, in
   the student's ranking, whose ranking gain is the whole list's (within ``TOP_K_TOLERANCE``);
4. ``route_lists``, by expected gain (:func:`lists_pay`): the answer a list gets (its head routed)
   minus the corrected student's on that kind's queries, for both jobs a grader does — ranking
   (per-query NDCG@10) and grading (macro-F1 of the corrected grade decisions) — with one
   bootstrap over queries for both. Lists are routed when a gain is established (the interval of
   either job's gain or of their sum lies above zero) and neither job's mean gain is negative: a
   teacher that grades far better but ranks worse in expectation keeps the lists on the student,
   and so does one whose gains are noise;
5. ``route_pairs``: whether per-pair routing of the pairs outside the head (at the bundle's
   ``pair_margin_threshold``, or its policy's ``error_threshold`` for older bundles) raises
   macro-F1 there without lowering NDCG@10.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import softmax
from darl_lite.decision_margin import (
    decision_margins,
    margin_quantiles,
    margin_threshold_for_rate,
)
from darl_lite.gain_evidence import (
    GainIntervals,
    GradedEvidence,
    bootstrap_gains,
    bootstrap_mean_interval,
    graded_evidence,
    graded_report,
    per_query_ndcg,
)
from darl_lite.list_evidence import (
    TOP_K_GRID,
    TOP_K_TOLERANCE,
    choose_list_top_k,
    list_gain_evidence,
    lists_pay,
)
from darl_lite.metrics import auroc, macro_f1
from darl_lite.shift import fit_query_shift
from darl_lite.shift_routing import DEFAULT_TEACHER_WEIGHT, ShiftKind, ShiftRouting

logger = logging.getLogger(__name__)

L2_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
BIAS_GRID: tuple[float, ...] = tuple(np.round(np.arange(-1.0, 3.01, 0.25), 2).tolist())
#: Fold draws averaged when choosing the answer that grades routed pairs (:func:`choose_grade_weight`).
GRADE_WEIGHT_SEEDS = 5
#: The share of in-distribution dev pairs per-pair routing wants, for bundles that name none.
DEFAULT_PAIR_ROUTE_RATE = 0.10


def choose_l2(
    reference: Sequence[str],
    pool: Sequence[str],
    eval_in: Sequence[str],
    eval_kind: Sequence[str],
    grid: Sequence[float] = L2_GRID,
) -> tuple[float, dict[str, float]]:
    """The L2 strength with the best query AUROC on the eval queries (ties: the strongest)."""
    if not eval_in or not eval_kind:  # one side only: hold out a fifth of the fitting queries
        rng = np.random.default_rng(0)
        ref, pl = np.asarray(sorted(set(reference))), np.asarray(sorted(set(pool)))
        ref_out, pl_out = rng.random(len(ref)) < 0.2, rng.random(len(pl)) < 0.2
        if ref_out.sum() == 0 or pl_out.sum() == 0 or ref_out.all() or pl_out.all():
            return 0.1, {}
        fit_ref, fit_pool = ref[~ref_out].tolist(), pl[~pl_out].tolist()
        eval_in, eval_kind = ref[ref_out].tolist(), pl[pl_out].tolist()
    else:
        fit_ref, fit_pool = list(reference), list(pool)
    scores: dict[str, float] = {}
    best = (-1.0, 0.0)
    for l2 in grid:
        det = fit_query_shift(fit_ref, fit_pool, l2=l2)
        a = auroc(det.probabilities(sorted(set(eval_in))), det.probabilities(sorted(set(eval_kind))))
        scores[str(l2)] = round(a, 4)
        if a >= best[0] - 1e-12:
            best = (a, l2)
    return best[1], scores


def fit_logit_bias(
    ev: GradedEvidence, grid: Sequence[float] = BIAS_GRID
) -> tuple[tuple[float, ...], float, float]:
    """``(bias, macro-F1 before, after)``: the grade-prior correction of the student for one population.

    A population is one kind of shift's queries, or the in-distribution rest; the caller passes its
    graded pairs only, so each population's decision rule is fitted and judged on its own pairs (a
    correction for questions is not diluted by, nor charged for, keyword traffic it never touches).
    On the shipped data, fitted on one half of the dev queries and judged on the other, this raised
    held-out macro-F1 on both ood_dev (0.292 -> 0.318) and dev (0.439 -> 0.470). The bias moves the
    grade *decision* (``argmax(logits + bias)``), never the probabilities that rank a list, so it
    cannot cost NDCG. Grade 0's bias stays 0 (only differences matter); the others come from
    ``grid``. Among biases within 0.005 macro-F1 of the best, the smallest (L1) wins: a correction
    needs its evidence.
    """
    n_classes = ev.student_logits.shape[1]
    base = macro_f1(ev.grades, ev.student_logits.argmax(1), n_classes)
    candidates = []
    for rest in product(grid, repeat=n_classes - 1):
        bias = np.asarray((0.0, *rest))
        f1 = macro_f1(ev.grades, (ev.student_logits + bias).argmax(1), n_classes)
        candidates.append((f1, -float(np.abs(bias).sum()), tuple(float(b) for b in bias)))
    best_f1 = max(c[0] for c in candidates)
    f1, _, chosen = max((c for c in candidates if c[0] >= best_f1 - 0.005), key=lambda c: (c[1], c[0]))
    if f1 <= base:
        return tuple(0.0 for _ in range(n_classes)), base, base
    return chosen, base, f1


@dataclass(frozen=True)
class InDistributionCorrection:
    """The grade decisions' corrections of pairs no kind claims, with what they were fitted on."""

    student: tuple[float, ...] | None
    fallback: tuple[float, ...] | None
    evidence: dict[str, Any]
    #: the teacher's weight in the answer that grades routed pairs (None: the served answer's)
    grade_weight: float | None = None


def fit_in_distribution_bias(
    evidence: GradedEvidence, shift: ShiftRouting, is_kind: NDArray[np.bool_] | None = None
) -> InDistributionCorrection:
    """The corrections (student and teacher) for pairs no kind claims, fitted on the graded
    in-distribution pairs among ``evidence`` (not marked ``is_kind``, not assigned to a kind by
    ``shift``); None where a correction does not pay or there are no such pairs."""
    rest = shift.assign(evidence.queries).kind == -1
    if is_kind is not None:
        rest &= ~np.asarray(is_kind, bool)
    if not rest.any():
        return InDistributionCorrection(None, None, {"pairs": 0, "decision": "no in-distribution evidence"})
    ev = evidence.subset(rest)
    student, before, after = fit_logit_bias(ev)
    grade_weight, grade_scores = choose_grade_weight(ev)
    fallback, t_before, t_after = fit_logit_bias(ev.teacher_view(grade_weight))
    record = {
        "pairs": int(rest.sum()),
        "macro_f1": [round(before, 4), round(after, 4)],
        "fallback_macro_f1": [round(t_before, 4), round(t_after, 4)],
        "grade_weight": grade_weight,
        "grade_weight_macro_f1": grade_scores,
    }
    return InDistributionCorrection(
        student if any(student) else None,
        fallback if any(fallback) else None,
        record,
        None if grade_weight == evidence.teacher_weight else grade_weight,
    )


def choose_grade_weight(
    ev: GradedEvidence, seeds: int = GRADE_WEIGHT_SEEDS
) -> tuple[float, dict[str, float]]:
    """The answer that grades a population's routed pairs: the served blend or the teacher alone,
    whichever has the higher macro-F1 on these pairs with its correction cross-fitted (two folds by
    query, averaged over ``seeds`` fold draws); ties keep the served blend. Ranking always uses the
    blend; grading is a separate decision, and a teacher may grade a population better on its own
    (the shipped ood_dev: 0.380 alone vs 0.348 blended) while the blend grades another better (dev:
    0.484 vs 0.505)."""
    candidates = list(dict.fromkeys((ev.teacher_weight, 1.0)))
    everything = np.ones(len(ev.queries), bool)
    scores: dict[str, float] = {}
    for weight in candidates:
        view = ev.teacher_view(weight)
        n_classes = view.student_logits.shape[1]
        f1 = [
            macro_f1(
                ev.grades,
                (view.student_logits + _cross_fitted_bias(view, everything, s)).argmax(1),
                n_classes,
            )
            for s in range(seeds)
        ]
        scores[str(weight)] = round(float(np.mean(f1)), 4)
    best = max(candidates, key=lambda w: (scores[str(w)], w == ev.teacher_weight))
    return best, scores


def fit_shift_kind(
    name: str,
    *,
    reference_queries: Sequence[str],
    pool_queries: Sequence[str],
    evidence: GradedEvidence,
    evidence_is_kind: NDArray[np.bool_] | None = None,
    error_threshold: float = 1.0,
    pair_margin_threshold: float | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    choose_head: bool = True,
) -> ShiftKind:
    """Fit one kind of shift (see the module docstring). ``evidence_is_kind`` marks the graded pairs
    known to be of this kind (e.g. ood_dev against dev); None means all of them are. Per-pair
    routing is judged at ``pair_margin_threshold`` on corrected decision margins when given (the
    bundle's :attr:`ShiftRouting.pair_margin_threshold`), else at ``error_threshold`` on ``1 - max
    p``. ``choose_head=False`` routes whole lists (no :func:`choose_list_top_k`)."""
    is_kind = (
        np.ones(len(evidence.queries), bool) if evidence_is_kind is None else np.asarray(evidence_is_kind)
    )
    detector, assigned, record = _fit_detector(reference_queries, pool_queries, evidence, is_kind, threshold)
    # "teacher" in the evidence is the answer a routed pair gets: this share of the teacher, the rest student
    record["teacher_weight"] = evidence.teacher_weight
    pool = tuple(sorted(set(pool_queries)))
    if not assigned.any():
        logger.warning("shift kind %r: no graded query is assigned to it; it routes nothing", name)
        return ShiftKind(
            name, detector, threshold, False, False, None, {**record, "decision": "no evidence"}, pool
        )
    corrections = _fit_corrections(evidence, assigned, record)
    top_k = _record_routing_evidence(
        evidence, assigned, corrections, record, error_threshold, pair_margin_threshold, seed, choose_head
    )
    route_lists, route_pairs = _decide(record, top_k)
    return ShiftKind(
        name,
        detector,
        threshold,
        route_lists,
        route_pairs,
        corrections.student if any(corrections.student) else None,
        record,
        pool,
        corrections.fallback if any(corrections.fallback) else None,
        None if corrections.grade_weight == evidence.teacher_weight else corrections.grade_weight,
        top_k if route_lists else None,
    )


def _fit_detector(
    reference_queries: Sequence[str],
    pool_queries: Sequence[str],
    evidence: GradedEvidence,
    is_kind: NDArray[np.bool_],
    threshold: float,
) -> tuple[Any, NDArray[np.bool_], dict[str, Any]]:
    """The kind's domain classifier (L2 chosen by query AUROC), which graded pairs it claims, and
    the record of both."""
    queries = np.asarray(evidence.queries, dtype=object)
    l2, l2_scores = choose_l2(reference_queries, pool_queries, *_split_queries(queries, is_kind))
    detector = fit_query_shift(reference_queries, pool_queries, l2=l2)
    assigned = detector.probabilities(evidence.queries) >= threshold
    record: dict[str, Any] = {
        "l2": l2,
        "l2_auroc": l2_scores,
        "graded_queries": len(set(evidence.queries)),
        "assigned_queries": len(set(queries[assigned])),
    }
    in_queries, kind_queries = _split_queries(queries, is_kind)
    if in_queries and kind_queries:
        record["query_auroc"] = round(
            auroc(detector.probabilities(in_queries), detector.probabilities(kind_queries)), 4
        )
    return detector, assigned, record


@dataclass(frozen=True)
class _KindCorrections:
    """A kind's grade decisions: the student's bias, the routed answer's weight and bias."""

    student: tuple[float, ...]
    grade_weight: float
    fallback: tuple[float, ...]


def _fit_corrections(
    evidence: GradedEvidence, assigned: NDArray[np.bool_], record: dict[str, Any]
) -> _KindCorrections:
    """The kind's corrections, fitted on its assigned graded pairs; their scores go to ``record``."""
    kind_pairs = evidence.subset(assigned)
    bias, f1_before, f1_after = fit_logit_bias(kind_pairs)
    grade_weight, grade_scores = choose_grade_weight(kind_pairs)
    fallback_bias, t_before, t_after = fit_logit_bias(evidence.teacher_view(grade_weight).subset(assigned))
    record.update(
        {
            "grade_weight": grade_weight,
            "grade_weight_macro_f1": grade_scores,
            "logit_bias_macro_f1": [round(f1_before, 4), round(f1_after, 4)],
            "fallback_bias_macro_f1": [round(t_before, 4), round(t_after, 4)],
        }
    )
    return _KindCorrections(bias, grade_weight, fallback_bias)


def _record_routing_evidence(
    evidence: GradedEvidence,
    assigned: NDArray[np.bool_],
    corrections: _KindCorrections,
    record: dict[str, Any],
    error_threshold: float,
    pair_margin_threshold: float | None,
    seed: int,
    choose_head: bool,
) -> int | None:
    """What routing the kind's lists (their head) and its other pairs one by one would gain over the
    cross-fitted corrected student, into ``record``; returns the head size (None: whole lists)."""
    teacher = evidence.teacher_view(corrections.grade_weight)
    decision_logits = evidence.student_logits + _cross_fitted_bias(evidence, assigned, seed)
    decided = decision_logits.argmax(axis=1)
    teacher_decided = (teacher.student_logits + _cross_fitted_bias(teacher, assigned, seed)).argmax(axis=1)
    ev = evidence.subset(assigned)
    top_k, top_k_gains = choose_list_top_k(ev) if choose_head else (None, {})
    record.update({"list_top_k": top_k, "list_top_k_ndcg_gain": top_k_gains})
    if pair_margin_threshold is not None:
        urgency = pair_margin_threshold - decision_margins(decision_logits[assigned])
        record["pair_margin_threshold"] = pair_margin_threshold
    else:
        student = softmax(ev.student_logits, ev.temperature)
        urgency = (1.0 - student.max(axis=1)) - error_threshold
    record.update(list_gain_evidence(ev, decided[assigned], teacher_decided[assigned], urgency, top_k, seed))
    return top_k


def _decide(record: dict[str, Any], top_k: int | None) -> tuple[bool, bool]:
    """``(route_lists, route_pairs)`` from the recorded evidence, and the decision in words."""
    route_lists = lists_pay(record)
    route_pairs = record["pair_routing_macro_f1_gain"] > 0.0 and record["pair_routing_ndcg_gain"] >= 0.0
    head = "whole lists" if top_k is None else f"the top {top_k} of each list"
    record["decision"] = (f"route {head}" if route_lists else "keep lists on the student") + (
        "; per-pair routing on" if route_pairs else "; per-pair routing off"
    )
    return route_lists, route_pairs


def _split_queries(queries: NDArray[Any], is_kind: NDArray[np.bool_]) -> tuple[list[str], list[str]]:
    """The distinct in-distribution queries and the distinct queries of the kind, sorted."""
    return sorted(set(queries[~is_kind])), sorted(set(queries[is_kind]))


def _cross_fitted_bias(ev: GradedEvidence, applies: NDArray[np.bool_], seed: int) -> NDArray[np.float64]:
    """Per pair, the kind's logit bias fitted on the other half of the queries (two folds by query;
    0 outside the kind), so the evidence compares the teacher with a corrected student that has not
    seen the pairs it is judged on."""
    distinct = list(dict.fromkeys(ev.queries))
    fold_of = dict(zip(distinct, np.random.default_rng(seed).permutation(len(distinct)) % 2, strict=True))
    fold = np.asarray([fold_of[q] for q in ev.queries])
    out = np.zeros_like(ev.student_logits)
    for f in (0, 1):
        train = fold != f
        if not (applies & train).any() or train.all():
            bias = np.asarray(fit_logit_bias(ev.subset(applies))[0])
        else:
            bias = np.asarray(fit_logit_bias(ev.subset(train & applies))[0])
        out[(fold == f) & applies] = bias
    return out


def pair_margin_threshold_for(
    in_distribution: GradedEvidence, rate: float
) -> tuple[float, tuple[tuple[float, float], ...]]:
    """The ``pair_margin_threshold`` that makes a share ``rate`` of these in-distribution dev pairs
    per-pair candidates, and their margins at every share (``pair_margin_quantiles``), on their
    decision margins after their own grade-prior correction (the correction
    :func:`fit_in_distribution_bias` fits on the same pairs)."""
    decision = in_distribution.student_logits + np.asarray(fit_logit_bias(in_distribution)[0])
    return margin_threshold_for_rate(decision, rate), margin_quantiles(decision)


def write_with_shift_routing(bundle: Any, shift: Any, out_dir: str, *, overwrite: bool = False) -> Any:
    """A new bundle at ``out_dir`` (may be the bundle's own directory): the same files plus ``shift``
    as its shift routing file, the manifest's ``routing.shift`` summary, every file re-hashed."""
    import tempfile
    from pathlib import Path

    from darl_lite.bundle import write_bundle
    from darl_lite.shift_routing import ROLE_SHIFT

    files = {
        role: bundle.directory / e["path"]
        for role, e in bundle.manifest["files"].items()
        if role != ROLE_SHIFT
    }
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "created", "package_versions")}
    manifest["routing"] = {
        **manifest.get("routing", {}),
        "shift": shift.summary(),
        **shift.in_distribution_summary(),
        "list_reserve_pairs": shift.list_reserve_pairs,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shift_routing.json"
        shift.save(str(path))
        files[ROLE_SHIFT] = path
        return write_bundle(out_dir, files, manifest, overwrite=overwrite)


def fit_pool_kind(
    bundle: Any,
    *,
    name: str,
    train_queries: Sequence[str],
    pool_queries: Sequence[str],
    dev_pairs: Sequence[Any],
    shifted_dev_pairs: Sequence[Any],
    teacher: Any,
    list_reserve_pairs: int = 200,
    threads: int = 0,
    teacher_weight: float = DEFAULT_TEACHER_WEIGHT,
) -> Any:
    """Fit one kind of shift from an unlabeled pool into ``bundle`` (rewritten in place, re-hashed).

    Detector: the training queries vs the pool's queries (the pool needs no grades). Evidence: graded
    in-distribution dev pairs and graded dev pairs of the shifted traffic, with ``teacher``'s grades
    (any object with ``predict_proba(pairs)``) for them, blended with the student's by
    ``teacher_weight`` as a routed pair's answer is (every decision and correction is fitted on
    the answer a node serves). Per-pair routing's margin threshold asks for the bundle's
    ``routing.target_route_rate`` of the in-distribution dev pairs without a window budget, and for
    what the budget affords with one (``pair_margin_quantiles``). ``list_reserve_pairs`` is capped
    at the kind's routed head.
    """
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer

    scorer = Scorer(bundle, session=SessionConfig(intra_op_threads=threads))
    graded = [*dev_pairs, *shifted_dev_pairs]
    evidence = graded_evidence(
        scorer,
        [p.query for p in graded],
        [p.item for p in graded],
        [p.grade for p in graded],
        teacher.predict_proba(graded),
    ).answered_with(teacher_weight)
    reference = sorted(set(train_queries))
    is_kind = np.r_[np.zeros(len(dev_pairs), bool), np.ones(len(shifted_dev_pairs), bool)]
    rate = float(bundle.manifest.get("routing", {}).get("target_route_rate", DEFAULT_PAIR_ROUTE_RATE))
    margin_threshold, quantiles = pair_margin_threshold_for(evidence.subset(~is_kind), rate)
    kind = fit_shift_kind(
        name,
        reference_queries=reference,
        pool_queries=sorted(set(pool_queries)),
        evidence=evidence,
        evidence_is_kind=is_kind,
        error_threshold=scorer.routing.error_threshold,
        pair_margin_threshold=margin_threshold,
    )
    logger.info("shift kind %r: %s", kind.name, kind.evidence.get("decision"))
    # the reserve need only cover one routed head: a larger one starves per-pair routing
    reserve = list_reserve_pairs if kind.list_top_k is None else min(list_reserve_pairs, kind.list_top_k)
    shift = ShiftRouting(
        (kind,),
        tuple(reference),
        list_reserve_pairs=reserve,
        teacher_weight=teacher_weight,
        pair_margin_threshold=margin_threshold,
        pair_margin_quantiles=quantiles,
    )
    correction = fit_in_distribution_bias(evidence, shift, is_kind)
    shift = replace(
        shift,
        in_distribution_bias=correction.student,
        in_distribution_evidence=correction.evidence,
        in_distribution_fallback_bias=correction.fallback,
        in_distribution_grade_weight=correction.grade_weight,
    )
    return write_with_shift_routing(bundle, shift, str(bundle.directory), overwrite=True)


__all__ = [
    "BIAS_GRID",
    "DEFAULT_PAIR_ROUTE_RATE",
    "GRADE_WEIGHT_SEEDS",
    "L2_GRID",
    "TOP_K_GRID",
    "TOP_K_TOLERANCE",
    "GainIntervals",
    "GradedEvidence",
    "InDistributionCorrection",
    "bootstrap_gains",
    "bootstrap_mean_interval",
    "choose_grade_weight",
    "choose_l2",
    "choose_list_top_k",
    "fit_in_distribution_bias",
    "fit_logit_bias",
    "fit_pool_kind",
    "fit_shift_kind",
    "graded_evidence",
    "graded_report",
    "lists_pay",
    "pair_margin_threshold_for",
    "per_query_ndcg",
    "write_with_shift_routing",
]
