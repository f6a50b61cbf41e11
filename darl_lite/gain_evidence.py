"""Graded evidence and the statistics routing decisions rest on.

A :class:`GradedEvidence` holds graded pairs with the student's raw logits and the teacher's
probabilities for them; :mod:`darl_lite.cascade_fit` fits every routing decision from one. The
intervals here resample *queries*, not pairs: a query's pairs move together, as they do in a ranked
list, so an interval reflects how many queries the evidence really has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import log_probabilities, softmax
from darl_lite.errors import InputError
from darl_lite.metrics import macro_f1, ndcg_at_k, per_class_f1
from darl_lite.shift_routing import blend_answer


@dataclass(frozen=True)
class GradedEvidence:
    """Graded pairs with the student's raw logits and the teacher's probabilities for them."""

    queries: Sequence[str]
    grades: NDArray[np.int64]
    student_logits: NDArray[np.float64]
    teacher_probs: NDArray[np.float64]  # the teacher's own probabilities
    temperature: float
    gains: Sequence[float]
    #: the teacher's weight in a routed pair's answer (see :meth:`answer`; 1.0: the teacher alone)
    teacher_weight: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.queries)
        shapes = {len(self.grades), len(self.student_logits), len(self.teacher_probs)}
        if shapes != {n}:
            raise InputError(f"graded evidence arrays differ in length: {sorted(shapes | {n})}")

    def answer(self, teacher_weight: float | None = None) -> NDArray[np.float64]:
        """A routed pair's probabilities: the teacher's blended with the student's by
        ``teacher_weight`` (default: the evidence's own, :func:`~darl_lite.shift_routing.blend_answer`)."""
        weight = self.teacher_weight if teacher_weight is None else teacher_weight
        return blend_answer(softmax(self.student_logits, self.temperature), self.teacher_probs, weight)

    def answered_with(self, teacher_weight: float) -> GradedEvidence:
        """The same pairs, with routed pairs answered by ``teacher_weight`` (every fit then judges
        the answer a node serves)."""
        return replace(self, teacher_weight=teacher_weight)

    def teacher_view(self, teacher_weight: float | None = None) -> GradedEvidence:
        """The same pairs with a routed pair's answer (at ``teacher_weight``, default the
        evidence's) in the student's place, as log-probabilities, so its grade decisions are
        corrected by the same fitting as the student's."""
        answer = self.answer(teacher_weight)
        return replace(
            self,
            student_logits=log_probabilities(answer),
            teacher_probs=answer,
            temperature=1.0,
            teacher_weight=1.0,
        )

    def subset(self, mask: NDArray[np.bool_]) -> GradedEvidence:
        index = np.flatnonzero(mask)
        return replace(
            self,
            queries=[self.queries[i] for i in index.tolist()],
            grades=self.grades[index],
            student_logits=self.student_logits[index],
            teacher_probs=self.teacher_probs[index],
        )


def per_query_ndcg(
    probs: NDArray[np.floating],
    grades: NDArray[np.integer],
    queries: Sequence[str],
    gains: Sequence[float],
    k: int = 10,
) -> dict[str, float]:
    """NDCG@k of each query's list, ranked by expected relevance."""
    expected = np.asarray(probs, np.float64) @ np.asarray(gains, np.float64)
    out: dict[str, float] = {}
    q = np.asarray(queries, dtype=object)
    for query in dict.fromkeys(queries):
        rows = q == query
        out[query] = ndcg_at_k([query] * int(rows.sum()), grades[rows], expected[rows], k=k, gains=gains)
    return out


def bootstrap_mean_interval(
    values: Sequence[float], *, seed: int = 0, draws: int = 2000, level: float = 0.90
) -> tuple[float, float]:
    """A two-sided percentile bootstrap interval of the mean (resampling queries)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(draws, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class GainIntervals:
    """Percentile bootstrap intervals of the teacher's gains over the student, resampling queries."""

    ndcg: tuple[float, float]  # mean per-query NDCG@10 gain
    macro_f1: tuple[float, float]  # macro-F1 gain over the pooled pairs
    combined: tuple[float, float]  # their sum, from the same resamples


def bootstrap_gains(
    ndcg_gains: Mapping[str, float],
    grades: NDArray[np.integer],
    student: NDArray[np.integer],
    teacher: NDArray[np.integer],
    queries: Sequence[str],
    n_classes: int,
    *,
    seed: int = 0,
    draws: int = 2000,
    level: float = 0.90,
) -> GainIntervals:
    """Intervals of the NDCG@10 gain (``ndcg_gains``: per query), the macro-F1 gain of the decided
    grades ``teacher`` over ``student``, and their sum; a query's pairs move together, as in a list."""
    distinct = {q: i for i, q in enumerate(ndcg_gains)}
    nan = (float("nan"), float("nan"))
    if not distinct:
        return GainIntervals(nan, nan, nan)
    row = np.fromiter((distinct[q] for q in queries), np.intp, count=len(queries))
    cells = n_classes * n_classes

    def confusions(decided: NDArray[np.integer]) -> NDArray[np.float64]:
        flat = row * cells + np.asarray(grades) * n_classes + np.asarray(decided)
        return np.bincount(flat, minlength=len(distinct) * cells).reshape(len(distinct), cells).astype(float)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(distinct), size=(draws, len(distinct)))
    weights = np.zeros((draws, len(distinct)))
    np.add.at(weights, (np.arange(draws)[:, None], picks), 1.0)
    ndcg = weights @ np.asarray(list(ndcg_gains.values()), np.float64) / len(distinct)
    f1 = _macro_f1_of(weights @ confusions(teacher), n_classes) - _macro_f1_of(
        weights @ confusions(student), n_classes
    )
    q = [(1 - level) / 2, 1 - (1 - level) / 2]

    def interval(x: NDArray[np.float64]) -> tuple[float, float]:
        lo, hi = np.quantile(x, q)
        return float(lo), float(hi)

    return GainIntervals(interval(ndcg), interval(f1), interval(ndcg + f1))


def _macro_f1_of(confusion: NDArray[np.float64], n_classes: int) -> NDArray[np.float64]:
    """Macro-F1 of each row of flattened ``(true, predicted)`` confusion counts, as
    :func:`~darl_lite.metrics.macro_f1` computes it (classes absent from both sides left out)."""
    c = confusion.reshape(-1, n_classes, n_classes)
    tp = np.einsum("dkk->dk", c)
    denom = c.sum(axis=2) + c.sum(axis=1)
    f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1e-12), np.nan)
    return np.nanmean(f1, axis=1)


def graded_report(
    probs: NDArray[np.floating],
    decided: NDArray[np.integer],
    grades: NDArray[np.integer],
    queries: Sequence[str],
    gains: Sequence[float],
) -> dict[str, float]:
    """macro-F1 and F1 of the top grade from the decided grades; NDCG@10 from the probabilities' ranking."""
    n_classes = np.shape(probs)[1]
    expected = np.asarray(probs, np.float64) @ np.asarray(gains, np.float64)
    return {
        "macro_f1": macro_f1(grades, decided, n_classes),
        "f1_top_grade": float(per_class_f1(grades, decided, n_classes)[-1]),
        "ndcg@10": ndcg_at_k(list(queries), grades, expected, k=10, gains=gains),
    }


def graded_evidence(
    scorer: Any,
    queries: Sequence[str],
    items: Sequence[str],
    grades: Sequence[int],
    teacher_probs: NDArray[np.floating],
) -> GradedEvidence:
    """Run the bundle's student on graded pairs and pair its raw logits with the teacher's grades."""
    if not (len(queries) == len(items) == len(grades) == len(teacher_probs)):
        raise InputError(
            f"graded pairs and teacher grades differ in length: {len(queries)} queries, {len(items)} "
            f"items, {len(grades)} grades, {len(teacher_probs)} teacher rows"
        )
    arrays = scorer.model.run(list(queries), list(items))
    return GradedEvidence(
        list(queries),
        np.asarray(grades, np.int64),
        np.asarray(arrays.logits, np.float64),
        np.asarray(teacher_probs, np.float64),
        scorer.temperature,
        scorer.bundle.grade_gains,
    )


__all__ = [
    "GainIntervals",
    "GradedEvidence",
    "bootstrap_gains",
    "bootstrap_mean_interval",
    "graded_evidence",
    "graded_report",
    "per_query_ndcg",
]
