"""Distribution-aware routing: whole shifted lists go to the teacher where the evidence says it wins.

A bundle may carry one or more *kinds of shift*, each a query-level domain classifier
(:class:`~darl_lite.shift.QueryShiftDetector`: training queries vs an unlabeled pool of that
traffic) with what was measured on graded dev pairs of that kind:

* ``route_lists`` — the teacher is expected to beat the student on those queries: it wins ranking
  (NDCG@10) or grading (macro-F1) with evidence and is not expected to lose the other
  (:func:`darl_lite.list_evidence.lists_pay`). Then the head of such a query's list goes to the teacher
  as one block, before per-pair routing spends what the budget has left: one model ranks the part
  of the list a user sees.
* ``list_top_k`` — how much of the list that block is: the student's ``list_top_k`` best pairs (by
  expected relevance), or the whole list (None). A cheap ranker picking the candidates an expensive
  one re-ranks is the classic cascade; the dev evidence chooses the smallest head that keeps the
  whole list's ranking gain (:func:`darl_lite.list_evidence.choose_list_top_k`), and the budget the
  tail would have cost goes to per-pair routing, where it buys more.
* ``route_pairs`` — per-pair routing pays on that kind's pairs outside the routed head (off where
  the teacher is worse: sending its pairs to the teacher would lower quality).
* ``logit_bias`` — the student's grade prior on that kind, corrected (added to its logits for the
  grade decision only): a student that never says "strong" on questions gets its prior back.
* ``fallback_bias`` — the same for the answers of that kind's routed pairs (added to the log of
  their probabilities), fitted on those answers for the same dev pairs.
* ``grade_weight`` — which answer grades that kind's routed pairs: the served blend (None) or the
  teacher alone (1.0), whichever graded its dev pairs better held out
  (:func:`darl_lite.cascade_fit.choose_grade_weight`); ranking always uses the served blend.

A routed pair's answer is ``teacher_weight * teacher + (1 - teacher_weight) * student`` (the
calibrated probabilities of both): an equal-weight ensemble (``DEFAULT_TEACHER_WEIGHT``) by
default, fixed a priori rather than fitted, so the dev evidence that decides routing is not also
spent choosing it. On the shipped dev splits it ranked better than either grader alone (NDCG@10 gain
over the student +0.064 on ood_dev and +0.074 on dev, against the teacher's +0.004 and +0.036), and
a list answered this way sits closer to the student's scale than the teacher's own answer.

Per-pair routing sends the pairs whose *corrected* grade decision is closest to flipping
(``pair_margin_threshold``: urgency = threshold − the gap between the two largest corrected logits):
a second opinion can only change a grade near its decision boundary, and after a population's
prior correction that boundary is not where the uncorrected probabilities are flattest. On the
shipped dev split (two folds by query, five draws), routing 10% of the pairs this way raised
macro-F1 by +0.016 ± 0.010, against +0.005 ± 0.004 for random pairs; on the full split, 0.491
against 0.484 for the uncorrected ``1 - max p``. Bundles without the threshold keep the routing
policy's own urgency.

Where the bundle has no evidence that the teacher wins on a kind of shift, it routes nothing for it.
A query that no kind claims is in-distribution and keeps the bundle's per-pair policy; its grade
decisions get their own corrections (``in_distribution_bias`` for the student,
``in_distribution_fallback_bias`` for the teacher, fitted on in-distribution dev pairs). The
fallback corrections hold for the teacher the bundle was fitted with (the tuned teacher served by
``darl-lite distill serve-teacher``); ``darl-lite refit-routing`` refits them for another grader.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.atomic import atomic_write_json
from darl_lite.calibration import log_probabilities
from darl_lite.decision_margin import decision_margins, list_heads
from darl_lite.errors import BundleError, InputError
from darl_lite.shift import QueryShiftDetector
from darl_lite.shift_fields import (
    bias_from_json,
    bias_json,
    check_weight,
    optional_float,
    optional_weight,
    quantiles_from_json,
    weight_from_json,
)

FORMAT = "darl-lite/shift-routing/1"
#: The teacher's weight in a routed pair's answer of newly fitted bundles (files without one: 1.0).
DEFAULT_TEACHER_WEIGHT = 0.5
#: The bundle file role of the shift routing file.
ROLE_SHIFT = "shift_routing"


@dataclass(frozen=True)
class ShiftKind:
    """One kind of shift: its detector, its threshold, and what the dev evidence allows."""

    name: str
    detector: QueryShiftDetector
    threshold: float = 0.5
    route_lists: bool = False
    route_pairs: bool = True
    logit_bias: tuple[float, ...] | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    pool_queries: tuple[str, ...] = ()
    fallback_bias: tuple[float, ...] | None = None
    #: the teacher's weight in the answer that grades routed pairs (None: the served answer's)
    grade_weight: float | None = None
    #: the routed head of a list: the student's best ``list_top_k`` pairs (None: the whole list)
    list_top_k: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"shift kind {self.name!r}: threshold must lie in (0, 1), got {self.threshold}")
        check_weight(self.grade_weight, f"shift kind {self.name!r}: grade_weight")
        if self.list_top_k is not None and (isinstance(self.list_top_k, bool) or self.list_top_k < 1):
            raise InputError(
                f"shift kind {self.name!r}: list_top_k must be a positive number of pairs or None "
                f"(the whole list), got {self.list_top_k!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "route_lists": self.route_lists,
            "route_pairs": self.route_pairs,
            "logit_bias": bias_json(self.logit_bias),
            "fallback_bias": bias_json(self.fallback_bias),
            "grade_weight": self.grade_weight,
            "list_top_k": self.list_top_k,
            "evidence": dict(self.evidence),
            "detector": self.detector.to_json(),
            "pool_queries": list(self.pool_queries),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> ShiftKind:
        try:
            return cls(
                name=str(data["name"]),
                detector=QueryShiftDetector.from_json(data["detector"], source=f"{source}: {data['name']}"),
                threshold=float(data["threshold"]),
                route_lists=bool(data["route_lists"]),
                route_pairs=bool(data.get("route_pairs", True)),
                logit_bias=bias_from_json(data.get("logit_bias"), source),
                evidence=dict(data.get("evidence") or {}),
                pool_queries=tuple(str(q) for q in data.get("pool_queries") or ()),
                fallback_bias=bias_from_json(data.get("fallback_bias"), source),
                grade_weight=optional_weight(data.get("grade_weight"), source),
                list_top_k=None if data.get("list_top_k") is None else int(data["list_top_k"]),
            )
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise BundleError(f"{source}: malformed shift kind ({exc!r}); re-export the bundle") from exc


@dataclass(frozen=True)
class QueryAssignment:
    """Per pair: the kind of shift its query belongs to (-1: none) and the detector's probability."""

    kind: NDArray[np.intp]
    probability: NDArray[np.float64]  # the largest kind probability (0 with no kinds)


@dataclass(frozen=True)
class ShiftRouting:
    """Every kind of shift the bundle knows, and the in-distribution queries they were fitted against."""

    kinds: tuple[ShiftKind, ...]
    reference_queries: tuple[str, ...] = ()
    #: Pairs of sliding-window allowance per-pair routing leaves for whole lists (see RouteBudget).
    list_reserve_pairs: int = 0
    #: The grade-prior correction of pairs no kind claims (fitted on in-distribution dev pairs).
    in_distribution_bias: tuple[float, ...] | None = None
    in_distribution_evidence: Mapping[str, Any] = field(default_factory=dict)
    #: The same for the answers of routed in-distribution pairs.
    in_distribution_fallback_bias: tuple[float, ...] | None = None
    #: The teacher's weight in a routed pair's answer (the rest is the student's); see the module.
    teacher_weight: float = 1.0
    #: The teacher's weight in the answer that grades routed in-distribution pairs (None: as served).
    in_distribution_grade_weight: float | None = None
    #: Per-pair urgency is this minus a pair's corrected decision margin (None: the policy's urgency).
    pair_margin_threshold: float | None = None
    #: In-distribution dev pairs' decision margins at a grid of shares: ``(share, margin)`` points,
    #: so a budget that can afford a share r of pairs sets the threshold that asks for r.
    pair_margin_quantiles: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        check_weight(self.teacher_weight, "teacher_weight")
        check_weight(self.in_distribution_grade_weight, "in_distribution_grade_weight")
        if self.pair_margin_threshold is not None and not np.isfinite(self.pair_margin_threshold):
            raise InputError(
                f"pair_margin_threshold must be a finite number, got {self.pair_margin_threshold}"
            )

    def assign(self, queries: Sequence[str]) -> QueryAssignment:
        """The kind of each pair's query: the most probable kind past its threshold, else -1.

        Scalar work per distinct query (a call usually has one or a few), not queries x kinds
        arrays: this runs on every call, right after the model pass, where each numpy call on a
        tiny array costs several times its idle price (docs/benchmarks.md, "Small calls")."""
        n = len(queries)
        if not self.kinds or not n:
            return QueryAssignment(np.full(n, -1, np.intp), np.zeros(n))
        found: dict[str, tuple[int, float]] = {}
        for query in queries:
            if query not in found:
                found[query] = self.assign_query(query)
        if len(found) == 1:
            ((kind, probability),) = found.values()
            return QueryAssignment(np.full(n, kind, np.intp), np.full(n, probability))
        kinds = np.fromiter((found[q][0] for q in queries), np.intp, count=n)
        probabilities = np.fromiter((found[q][1] for q in queries), np.float64, count=n)
        return QueryAssignment(kinds, probabilities)

    def assign_query(self, query: str) -> tuple[int, float]:
        """``(kind, largest probability)`` of one query: the first most probable kind past its
        threshold (-1: none), and the largest of its kinds' probabilities."""
        chosen, chosen_probability, largest = -1, -1.0, 0.0
        for index, kind in enumerate(self.kinds):
            probability = kind.detector.probability(query)
            largest = max(largest, probability)
            if probability >= kind.threshold and probability > chosen_probability:
                chosen, chosen_probability = index, probability
        return chosen, largest

    def decision_logits(self, logits: NDArray[np.floating], kind: NDArray[np.intp]) -> NDArray[np.float64]:
        """The student's logits plus each row's population correction (``kind``: each row's
        population, -1 for none): their argmax is the grade decision."""
        biases = [(k.name, k.logit_bias) for k in self.kinds]
        return _corrected(logits, kind, [*biases, ("in-distribution", self.in_distribution_bias)])

    def student_grades(self, logits: NDArray[np.floating], kind: NDArray[np.intp]) -> NDArray[np.intp]:
        """The student's grade decisions (``kind`` as above): argmax of its corrected logits."""
        return row_argmax(self.decision_logits(logits, kind))

    def pair_urgency(
        self, logits: NDArray[np.floating], kind: NDArray[np.intp], share: float | None = None
    ) -> NDArray[np.float64] | None:
        """Per-pair routing urgency (> 0: a candidate, larger first): a margin threshold minus the
        gap between the two largest corrected logits; None when the bundle has no threshold (the
        routing policy's urgency then applies). The threshold is :meth:`margin_threshold` of
        ``share``, the share of pairs the budget can afford (None: the bundle's fixed threshold)."""
        return self.margin_urgency(self.decision_logits(logits, kind), share)

    def margin_urgency(
        self, decision_logits: NDArray[np.floating], share: float | None = None
    ) -> NDArray[np.float64] | None:
        """:meth:`pair_urgency` from :meth:`decision_logits` already computed."""
        threshold = self.margin_threshold(share)
        if threshold is None:
            return None
        return threshold - decision_margins(decision_logits)

    def margin_threshold(self, share: float | None = None) -> float | None:
        """The margin below which a pair is a per-pair candidate: the one that made ``share`` of
        the in-distribution dev pairs candidates (from ``pair_margin_quantiles``), so routing asks
        for about what the budget can grant and the grant goes to the most urgent pairs rather than
        to whichever came first; ``pair_margin_threshold`` when ``share`` is None or the bundle
        has no quantiles."""
        if share is None or not self.pair_margin_quantiles or self.pair_margin_threshold is None:
            return self.pair_margin_threshold
        shares, margins = zip(*self.pair_margin_quantiles, strict=True)
        return float(np.interp(min(max(share, 0.0), 1.0), shares, margins))

    def fallback_answer(
        self, student: NDArray[np.floating], teacher: NDArray[np.floating], kind: NDArray[np.intp]
    ) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
        """Routed pairs' served probabilities (the blend at ``teacher_weight``: they rank) and grade
        decisions (from each population's grading answer, corrected) from the student's calibrated
        probabilities and the teacher's for them (``kind`` as above)."""
        answer = blend_answer(student, teacher, self.teacher_weight)
        graded = answer
        weights = [k.grade_weight for k in self.kinds] + [self.in_distribution_grade_weight]
        kind = np.asarray(kind, np.intp)
        for index, weight in enumerate(weights):
            rows = kind == (index if index < len(self.kinds) else -1)
            if weight is None or weight == self.teacher_weight or not rows.any():
                continue
            if graded is answer:
                graded = answer.copy()
            graded[rows] = blend_answer(np.asarray(student)[rows], np.asarray(teacher)[rows], weight)
        return answer, self.fallback_grades(graded, kind)

    def fallback_grades(
        self, probabilities: NDArray[np.floating], kind: NDArray[np.intp]
    ) -> NDArray[np.intp]:
        """Grade decisions for routed pairs' answers (``kind`` as above): argmax of their
        log-probabilities plus that population's fallback correction."""
        biases = [(k.name, k.fallback_bias) for k in self.kinds]
        biases.append(("in-distribution", self.in_distribution_fallback_bias))
        if all(b is None for _, b in biases):  # no correction: the argmax needs no logarithm
            return np.asarray(probabilities).argmax(axis=1) if len(probabilities) else np.zeros(0, np.intp)
        return _corrected_argmax(log_probabilities(probabilities), kind, biases)

    def list_candidates(
        self,
        assignment: QueryAssignment,
        queries: Sequence[str],
        student: NDArray[np.floating],
        gains: NDArray[np.floating],
    ) -> NDArray[np.bool_]:
        """Pairs of the routed head of each list whose query belongs to a kind on which the teacher
        is expected to win: the whole list, or its ``list_top_k`` pairs of highest expected
        relevance (``student`` probabilities times grade ``gains``; :func:`list_heads`), computed
        for those pairs only."""
        allowed = np.asarray([k.route_lists for k in self.kinds] + [False], bool)
        lists = allowed[assignment.kind]  # index -1 reads the trailing False
        if not lists.any():  # no pair's query belongs to a kind that routes lists
            return lists
        for index, kind in enumerate(self.kinds):
            if kind.list_top_k is None:
                continue
            rows = np.flatnonzero(lists & (assignment.kind == index))
            if len(rows):
                relevance = np.einsum("nc,c->n", np.asarray(student)[rows], gains, optimize=False)  # no BLAS
                head = list_heads([queries[i] for i in rows.tolist()], relevance, kind.list_top_k)
                lists[rows[~head]] = False
        return lists

    def pair_routing_allowed(self, assignment: QueryAssignment) -> NDArray[np.bool_]:
        """Pairs per-pair uncertainty routing may send: in-distribution ones, and kinds where it pays."""
        allowed = np.asarray([k.route_pairs for k in self.kinds] + [True], bool)
        return allowed[assignment.kind]

    @property
    def reserve_pairs(self) -> int:
        """The allowance per-pair routing must leave: the reserve, when some kind routes lists."""
        return self.list_reserve_pairs if any(k.route_lists for k in self.kinds) else 0

    def with_kind(self, kind: ShiftKind) -> ShiftRouting:
        """A copy with ``kind`` added, or replacing the kind of the same name."""
        kinds = (*tuple(k for k in self.kinds if k.name != kind.name), kind)
        return replace(self, kinds=kinds)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "list_reserve_pairs": self.list_reserve_pairs,
            "reference_queries": list(self.reference_queries),
            "teacher_weight": self.teacher_weight,
            "kinds": [k.to_json() for k in self.kinds],
            **self.in_distribution_summary(),
        }

    def in_distribution_summary(self) -> dict[str, Any]:
        """What the manifest's ``routing`` shows of the in-distribution corrections."""
        return {
            "teacher_weight": self.teacher_weight,
            "in_distribution_grade_weight": self.in_distribution_grade_weight,
            "in_distribution_bias": bias_json(self.in_distribution_bias),
            "in_distribution_fallback_bias": bias_json(self.in_distribution_fallback_bias),
            "in_distribution_evidence": dict(self.in_distribution_evidence),
            "pair_margin_threshold": self.pair_margin_threshold,
            "pair_margin_quantiles": [list(p) for p in self.pair_margin_quantiles],
        }

    def summary(self) -> list[dict[str, Any]]:
        """What the manifest shows of each kind (no weights, no queries)."""
        return [
            {
                "name": k.name,
                "threshold": k.threshold,
                "route_lists": k.route_lists,
                "route_pairs": k.route_pairs,
                "logit_bias": bias_json(k.logit_bias),
                "fallback_bias": bias_json(k.fallback_bias),
                "grade_weight": k.grade_weight,
                "list_top_k": k.list_top_k,
                "evidence": dict(k.evidence),
            }
            for k in self.kinds
        ]

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_json(), indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> ShiftRouting:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read the shift routing file {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{path}: not a {FORMAT} file; re-export the bundle")
        kinds = tuple(ShiftKind.from_json(k, path) for k in data.get("kinds") or ())
        return cls(
            kinds=kinds,
            reference_queries=tuple(str(q) for q in data.get("reference_queries") or ()),
            list_reserve_pairs=int(data.get("list_reserve_pairs", 0)),
            in_distribution_bias=bias_from_json(data.get("in_distribution_bias"), path),
            in_distribution_evidence=dict(data.get("in_distribution_evidence") or {}),
            in_distribution_fallback_bias=bias_from_json(data.get("in_distribution_fallback_bias"), path),
            teacher_weight=weight_from_json(data.get("teacher_weight", 1.0), path),
            in_distribution_grade_weight=optional_weight(data.get("in_distribution_grade_weight"), path),
            pair_margin_threshold=optional_float(
                data.get("pair_margin_threshold"), "pair_margin_threshold", path
            ),
            pair_margin_quantiles=quantiles_from_json(data.get("pair_margin_quantiles"), path),
        )


def _corrected_argmax(
    values: NDArray[np.floating], kind: NDArray[np.intp], biases: list[tuple[str, tuple[float, ...] | None]]
) -> NDArray[np.intp]:
    """Row-wise argmax of :func:`_corrected` values."""
    return row_argmax(_corrected(values, kind, biases))


def row_argmax(values: NDArray[np.floating]) -> NDArray[np.intp]:
    """Each row's argmax; an empty array for no rows."""
    return np.asarray(values).argmax(axis=1) if len(values) else np.zeros(0, np.intp)


def _corrected(
    values: NDArray[np.floating], kind: NDArray[np.intp], biases: list[tuple[str, tuple[float, ...] | None]]
) -> NDArray[np.float64]:
    """``values`` with ``biases[k]`` added to the rows of population ``k`` (the last entry:
    population -1, the in-distribution rest); no copy when no population has a bias.

    One indexed add of a (populations, grades) table, zeros where a population has none: this runs
    on every call right after the model pass, where each numpy call costs several times its idle
    price (docs/benchmarks.md, "Eighth session")."""
    array: NDArray[np.float64] = np.asarray(values, np.float64)
    if not len(array) or all(bias is None for _, bias in biases):
        return array
    kind = np.asarray(kind, np.intp)
    width = array.shape[1]
    for index, (name, bias) in enumerate(biases):
        if (
            bias is not None
            and len(bias) != width
            and (kind == (index if index < len(biases) - 1 else -1)).any()
        ):
            raise BundleError(
                f"{name!r} grade-prior correction has {len(bias)} logit biases for "
                f"{width} grades; re-export the bundle"
            )
    table = np.asarray(
        [bias if bias is not None and len(bias) == width else (0.0,) * width for _, bias in biases],
        np.float64,
    )
    return array + table[kind]  # kind -1 reads the last row: the in-distribution rest


def blend_answer(
    student: NDArray[np.floating], teacher: NDArray[np.floating], teacher_weight: float
) -> NDArray[np.float64]:
    """``teacher_weight * teacher + (1 - teacher_weight) * student``, row by row (both rows are
    probability distributions, so the blend is one)."""
    t: NDArray[np.float64] = np.asarray(teacher, np.float64)
    if teacher_weight == 1.0:
        return t
    s: NDArray[np.float64] = np.asarray(student, np.float64)
    if s.shape != t.shape:
        raise InputError(f"student rows {s.shape} and teacher rows {t.shape} differ in shape")
    return teacher_weight * t + (1.0 - teacher_weight) * s


__all__ = [
    "DEFAULT_TEACHER_WEIGHT",
    "FORMAT",
    "ROLE_SHIFT",
    "QueryAssignment",
    "ShiftKind",
    "ShiftRouting",
    "blend_answer",
    "row_argmax",
]
