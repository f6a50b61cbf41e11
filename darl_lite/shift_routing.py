"""Distribution-aware routing: whole shifted lists go to the teacher where the evidence says it wins.

A bundle may carry one or more *kinds of shift*, each a query-level domain classifier
(:class:`~darl_lite.shift.QueryShiftDetector`: training queries vs an unlabeled pool of that
traffic) with what was measured on graded dev pairs of that kind:

* ``route_lists`` — the teacher is expected to beat the student on those queries: it wins ranking
  (NDCG@10) or grading (macro-F1) with evidence and is not expected to lose the other
  (:func:`darl_lite.cascade_fit.lists_pay`). Then every pair of such a query goes to the teacher, as one
  list, before per-pair uncertainty routing spends what the budget has left: one model scores a
  ranked list, so no list is a mix of two models' scales.
* ``route_pairs`` — per-pair uncertainty routing pays on that kind (off where the teacher is worse:
  sending its pairs to the teacher would lower quality).
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
from darl_lite.errors import BundleError, InputError
from darl_lite.shift import QueryShiftDetector

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

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"shift kind {self.name!r}: threshold must lie in (0, 1), got {self.threshold}")
        _check_weight(self.grade_weight, f"shift kind {self.name!r}: grade_weight")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "route_lists": self.route_lists,
            "route_pairs": self.route_pairs,
            "logit_bias": _bias_json(self.logit_bias),
            "fallback_bias": _bias_json(self.fallback_bias),
            "grade_weight": self.grade_weight,
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
                logit_bias=_bias_from_json(data.get("logit_bias"), source),
                evidence=dict(data.get("evidence") or {}),
                pool_queries=tuple(str(q) for q in data.get("pool_queries") or ()),
                fallback_bias=_bias_from_json(data.get("fallback_bias"), source),
                grade_weight=_optional_weight(data.get("grade_weight"), source),
            )
        except (KeyError, TypeError, ValueError) as exc:
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

    def __post_init__(self) -> None:
        _check_weight(self.teacher_weight, "teacher_weight")
        _check_weight(self.in_distribution_grade_weight, "in_distribution_grade_weight")

    def assign(self, queries: Sequence[str]) -> QueryAssignment:
        """The kind of each pair's query: the most probable kind past its threshold, else -1."""
        n = len(queries)
        kind = np.full(n, -1, np.intp)
        best = np.zeros(n)
        if not self.kinds or not n:
            return QueryAssignment(kind, best)
        distinct = list(dict.fromkeys(queries))
        probs = np.stack([k.detector.probabilities(distinct) for k in self.kinds], axis=1)  # (Q, K)
        past = probs >= np.asarray([k.threshold for k in self.kinds])[None, :]
        chosen = np.where(past.any(axis=1), np.where(past, probs, -1.0).argmax(axis=1), -1)
        row_of = {q: i for i, q in enumerate(distinct)}
        rows = np.fromiter((row_of[q] for q in queries), np.intp, count=n)
        return QueryAssignment(chosen[rows].astype(np.intp), probs.max(axis=1)[rows])

    def student_grades(self, logits: NDArray[np.floating], kind: NDArray[np.intp]) -> NDArray[np.intp]:
        """The student's grade decisions (``kind``: each row's population, -1 for none): argmax of
        its logits plus that population's correction."""
        biases = [(k.name, k.logit_bias) for k in self.kinds]
        return _corrected_argmax(logits, kind, [*biases, ("in-distribution", self.in_distribution_bias)])

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

    def list_candidates(self, assignment: QueryAssignment) -> NDArray[np.bool_]:
        """Pairs whose query belongs to a kind on which the teacher ranks better (whole lists)."""
        allowed = np.asarray([k.route_lists for k in self.kinds] + [False], bool)
        return allowed[assignment.kind]  # index -1 reads the trailing False

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
            "in_distribution_bias": _bias_json(self.in_distribution_bias),
            "in_distribution_fallback_bias": _bias_json(self.in_distribution_fallback_bias),
            "in_distribution_evidence": dict(self.in_distribution_evidence),
        }

    def summary(self) -> list[dict[str, Any]]:
        """What the manifest shows of each kind (no weights, no queries)."""
        return [
            {
                "name": k.name,
                "threshold": k.threshold,
                "route_lists": k.route_lists,
                "route_pairs": k.route_pairs,
                "logit_bias": _bias_json(k.logit_bias),
                "fallback_bias": _bias_json(k.fallback_bias),
                "grade_weight": k.grade_weight,
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
            in_distribution_bias=_bias_from_json(data.get("in_distribution_bias"), path),
            in_distribution_evidence=dict(data.get("in_distribution_evidence") or {}),
            in_distribution_fallback_bias=_bias_from_json(data.get("in_distribution_fallback_bias"), path),
            teacher_weight=_weight_from_json(data.get("teacher_weight", 1.0), path),
            in_distribution_grade_weight=_optional_weight(data.get("in_distribution_grade_weight"), path),
        )


def _corrected_argmax(
    values: NDArray[np.floating], kind: NDArray[np.intp], biases: list[tuple[str, tuple[float, ...] | None]]
) -> NDArray[np.intp]:
    """Row-wise argmax of ``values`` with ``biases[k]`` added to the rows of population ``k`` (the
    last entry: population -1, the in-distribution rest); no copy when no bias applies."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return np.zeros(0, np.intp)
    kind = np.asarray(kind, np.intp)
    out = values
    for index, (name, bias) in enumerate(biases):
        rows = kind == (index if index < len(biases) - 1 else -1)
        if bias is None or not rows.any():
            continue
        if len(bias) != values.shape[1]:
            raise BundleError(
                f"{name!r} grade-prior correction has {len(bias)} logit biases for "
                f"{values.shape[1]} grades; re-export the bundle"
            )
        if out is values:
            out = values.copy()
        out[rows] += np.asarray(bias)
    return out.argmax(axis=1)


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


def _check_weight(weight: float | None, name: str) -> None:
    if weight is not None and not 0.0 < weight <= 1.0:
        raise InputError(f"{name} must lie in (0, 1], got {weight}")


def _optional_weight(raw: object, source: str) -> float | None:
    return None if raw is None else _weight_from_json(raw, source)


def _weight_from_json(raw: object, source: str) -> float:
    try:
        weight = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: malformed teacher_weight ({exc!r}); re-export the bundle") from exc
    if not 0.0 < weight <= 1.0:
        raise BundleError(f"{source}: teacher_weight {weight} outside (0, 1]; re-export the bundle")
    return weight


def _bias_json(bias: tuple[float, ...] | None) -> list[float] | None:
    return list(bias) if bias is not None else None


def _bias_from_json(raw: object, source: str) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(b) for b in raw)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{source}: malformed grade-prior correction ({exc!r}); re-export the bundle"
        ) from exc


__all__ = [
    "DEFAULT_TEACHER_WEIGHT",
    "FORMAT",
    "ROLE_SHIFT",
    "QueryAssignment",
    "ShiftKind",
    "ShiftRouting",
    "blend_answer",
]
