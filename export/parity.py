"""Does the int8 graph still grade and rank like the fp32 one? Numbers and a pass/fail check.

Quantization error is judged where it matters to search: the grade argmax (what a filter reads), the
order of the expected relevance ``softmax(logits) @ gains`` (what ranking reads; Spearman with
average ranks for ties), and, when human grades are at hand, NDCG@10 of each model and their ratio
and the macro-F1 of each model's argmax grade against the human grades (the drop, in points).
The max absolute logit difference is reported too: a scale bug shows there first, even when the
ranking happens to survive. Everything is numpy; ranking metrics come from :mod:`darl_lite.metrics`
so export and evaluation use the same tie rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from darl_lite.calibration import softmax
from darl_lite.errors import DarlLiteError, InputError
from darl_lite.metrics import macro_f1, ndcg_at_k, spearman
from darl_lite.types import GRADE_GAINS

logger = logging.getLogger(__name__)

NDCG_K = 10


class ParityError(DarlLiteError):
    """The int8 model answers too differently from fp32; the export is refused and no bundle written."""


@dataclass(frozen=True)
class ParityReport:
    """fp32 vs int8 on the same pairs, in plain Python values (``to_dict()`` is JSON-ready).

    The NDCG and macro-F1 fields are ``None`` when no human grades were given. ``macro_f1_drop`` is
    in points: ``100 * (macro_f1_fp32 - macro_f1_int8)``, positive when int8 grades worse.
    ``nonfinite_int8`` counts int8 rows with NaN/inf logits; those rows count as disagreeing and
    make Spearman NaN.
    """

    n_pairs: int
    argmax_agreement: float
    spearman: float
    max_abs_logit_diff: float
    mean_abs_expected_relevance_diff: float
    nonfinite_int8: int
    ndcg_fp32: float | None = None
    ndcg_int8: float | None = None
    ndcg_retention: float | None = None
    macro_f1_fp32: float | None = None
    macro_f1_int8: float | None = None
    macro_f1_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; NaN/inf become ``None`` so ``json.dump`` writes standard JSON."""
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()
        }


@dataclass(frozen=True)
class ParityThresholds:
    """Bounds an int8 graph must meet to ship.

    ``min_argmax_agreement`` is 0.99: measured on the quickstart's MiniLM-L6 student, plain dynamic
    int8 (classifier head in fp32) agrees on 0.988 of the gate pairs, and excluding the few most
    quantization-sensitive matrix products (see ``darl_lite.export.quantize.sensitivity_sweep``)
    lifts it past 0.99 (docs/export.md). ``max_macro_f1_drop`` is in points of macro-F1 (0-100) and,
    like NDCG retention, only checked when the parity pairs carry human grades.
    ``max_abs_logit_diff`` is off by default because a tolerable logit shift depends on the logit
    scale of the model. Positional order of the first four fields is kept for compatibility.
    """

    min_argmax_agreement: float = 0.99
    min_spearman: float = 0.99
    min_ndcg_retention: float = 0.99
    max_abs_logit_diff: float | None = None
    max_macro_f1_drop: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise InputError(f"{name} must be an (n_pairs, n_grades ≥ 2) matrix, got shape {arr.shape}")
    return arr


def _pair_logits(fp32: ArrayLike, int8: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    a, b = _logits(fp32, "fp32_logits"), _logits(int8, "int8_logits")
    if a.shape != b.shape:
        raise InputError(
            f"fp32_logits {a.shape} and int8_logits {b.shape} must have the same shape: "
            "score the same pairs, in the same order, with both models"
        )
    if not np.all(np.isfinite(a)):
        raise InputError("fp32_logits hold NaN/inf; the fp32 graph is the reference and must be finite")
    return a, b


def _expected_relevance(logits: NDArray[np.float64], gains: NDArray[np.float64]) -> NDArray[np.float64]:
    """``softmax(logits) @ gains`` row by row, computed stably (max subtracted)."""
    if logits.shape[1] != len(gains):
        raise InputError(
            f"logits have {logits.shape[1]} grade columns but gains has {len(gains)} entries; "
            "pass one gain per grade"
        )
    result: NDArray[np.float64] = softmax(logits) @ gains
    return result


def parity_report(
    fp32_logits: ArrayLike,
    int8_logits: ArrayLike,
    *,
    grades: ArrayLike | None = None,
    query_ids: Sequence[Hashable] | NDArray[Any] | None = None,
    gains: Sequence[float] = GRADE_GAINS,
) -> ParityReport:
    """Compare the logits of the two graphs on the same ``(n_pairs, n_grades)`` pairs.

    Pass ``grades`` (human grade per pair) and ``query_ids`` together to get NDCG@10 of each model,
    ranking by expected relevance, ``ndcg_retention = ndcg_int8 / ndcg_fp32``, and the macro-F1 of
    each model's argmax grade (non-finite int8 rows count as wrong) with its drop in points.
    """
    a, b = _pair_logits(fp32_logits, int8_logits)
    gain_table = np.asarray(gains, dtype=np.float64)
    finite = np.all(np.isfinite(b), axis=1)
    n_bad = int(np.sum(~finite))
    if n_bad:
        logger.warning("int8 logits hold NaN/inf in %d of %d pairs", n_bad, len(b))

    agree = (np.argmax(a, axis=1) == np.argmax(b, axis=1)) & finite
    er_a = _expected_relevance(a, gain_table)
    if n_bad:
        rho, max_diff, mean_er_diff = math.nan, math.inf, math.inf
        er_b = None
    else:
        er_b = _expected_relevance(b, gain_table)
        rho = spearman(er_a, er_b) if len(a) >= 2 else math.nan
        max_diff = float(np.max(np.abs(a - b)))
        mean_er_diff = float(np.mean(np.abs(er_a - er_b)))

    ndcg_a = ndcg_b = retention = f1_a = f1_b = f1_drop = None
    if (grades is None) != (query_ids is None):
        raise InputError("pass grades and query_ids together (NDCG needs both), or neither")
    if grades is not None and query_ids is not None:
        truth = np.asarray(grades)
        if truth.shape != (len(a),):
            raise InputError(f"grades must hold one grade per pair ({len(a)}), got shape {truth.shape}")
        gain_list = [float(g) for g in gain_table]
        ndcg_a = ndcg_at_k(query_ids, grades, er_a, k=NDCG_K, gains=gain_list)
        ndcg_b = math.nan if er_b is None else ndcg_at_k(query_ids, grades, er_b, k=NDCG_K, gains=gain_list)
        retention = ndcg_b / ndcg_a if ndcg_a > 0 and math.isfinite(ndcg_b) else math.nan
        n_grades = a.shape[1]
        # a non-finite int8 row is graded -1, never equal to a human grade: it counts as a miss
        pred_b = np.where(finite, np.argmax(np.where(finite[:, None], b, 0.0), axis=1), -1)
        f1_a = macro_f1(truth, np.argmax(a, axis=1), n_grades)
        f1_b = _macro_f1_with_misses(truth, pred_b, n_grades)
        f1_drop = 100.0 * (f1_a - f1_b)

    return ParityReport(
        n_pairs=len(a),
        argmax_agreement=float(np.mean(agree)),
        spearman=float(rho),
        max_abs_logit_diff=max_diff,
        mean_abs_expected_relevance_diff=mean_er_diff,
        nonfinite_int8=n_bad,
        ndcg_fp32=ndcg_a,
        ndcg_int8=ndcg_b,
        ndcg_retention=retention,
        macro_f1_fp32=f1_a,
        macro_f1_int8=f1_b,
        macro_f1_drop=f1_drop,
    )


def _macro_f1_with_misses(truth: NDArray[Any], predicted: NDArray[Any], n_grades: int) -> float:
    """Macro-F1 where a prediction of -1 (no answer) is a false negative of its true class only."""
    answered = predicted >= 0
    if answered.all():
        return macro_f1(truth, predicted, n_grades)
    truth = truth.astype(np.int64)
    tp = np.bincount(truth[answered & (truth == predicted)], minlength=n_grades).astype(np.float64)
    denom = np.bincount(truth, minlength=n_grades) + np.bincount(predicted[answered], minlength=n_grades)
    present = denom > 0
    return float(np.mean(2.0 * tp[present] / denom[present]))


def check_parity(report: ParityReport, thresholds: ParityThresholds | None = None) -> list[str]:
    """The thresholds ``report`` breaks, one readable line each; an empty list means it passes.

    A NaN metric fails its bound (it cannot be shown to hold). NDCG retention and the macro-F1 drop
    are only checked when the report has them (the parity pairs were graded).
    """
    t = thresholds or ParityThresholds()
    failures = []
    if report.nonfinite_int8:
        failures.append(f"int8 logits are NaN/inf for {report.nonfinite_int8} of {report.n_pairs} pairs")
    if not report.argmax_agreement >= t.min_argmax_agreement:
        failures.append(
            f"grade argmax agreement {report.argmax_agreement:.4f} < {t.min_argmax_agreement} "
            f"({report.n_pairs} pairs)"
        )
    if not report.spearman >= t.min_spearman:
        failures.append(f"Spearman of expected relevance {report.spearman:.4f} < {t.min_spearman}")
    if t.max_abs_logit_diff is not None and not report.max_abs_logit_diff <= t.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {report.max_abs_logit_diff:.4g} > {t.max_abs_logit_diff}")
    if report.ndcg_retention is not None and not report.ndcg_retention >= t.min_ndcg_retention:
        failures.append(
            f"NDCG@{NDCG_K} retention {report.ndcg_retention:.4f} < {t.min_ndcg_retention} "
            f"(fp32 {report.ndcg_fp32}, int8 {report.ndcg_int8})"
        )
    if report.macro_f1_drop is not None and not report.macro_f1_drop <= t.max_macro_f1_drop:
        failures.append(
            f"macro-F1 drop {report.macro_f1_drop:.2f} points > {t.max_macro_f1_drop} "
            f"(fp32 {report.macro_f1_fp32:.4f}, int8 {report.macro_f1_int8:.4f})"
        )
    return failures


def worst_pairs(
    fp32_logits: ArrayLike, int8_logits: ArrayLike, k: int = 5, *, gains: Sequence[float] = GRADE_GAINS
) -> list[int]:
    """Indices of the ``k`` pairs whose expected relevance moved most, largest ``|Δ|`` first.

    Pairs with non-finite int8 logits come first. Ties keep input order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"k must be a non-negative integer, got {k!r}")
    a, b = _pair_logits(fp32_logits, int8_logits)
    gain_table = np.asarray(gains, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(_expected_relevance(a, gain_table) - _expected_relevance(b, gain_table))
    delta[~np.isfinite(delta)] = np.inf
    order = np.argsort(-delta, kind="stable")[:k]
    return [int(i) for i in order]
