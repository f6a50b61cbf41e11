"""Evaluation metrics in plain numpy: grading quality, ranking quality, calibration, OOD detection.

Implemented here rather than taken from scikit-learn so the runtime (and a search node's monitoring)
needs no extra dependency, and so every tie rule is written down and tested. Inputs are checked and
bad shapes fail with :class:`~darl_lite.errors.InputError` saying what was expected and what came.
Scalar results are plain Python floats, safe to dump as JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from darl_lite.errors import InputError
from darl_lite.types import GRADE_GAINS, Pair

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Rows of a probability matrix must sum to 1 within this tolerance (catches logits passed by mistake).
PROB_SUM_TOL = 1e-3


# --------------------------------------------------------------------------------------------------
# Input checks


def _labels(values: ArrayLike, name: str, n_classes: int | None = None) -> IntArray:
    """A 1-D integer label array, each label in ``[0, n_classes)`` when ``n_classes`` is given."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} is empty; metrics need at least one sample")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"{name} must hold integer labels, got non-integral values")
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    labels = arr.astype(np.int64)
    if n_classes is not None and (labels.min() < 0 or labels.max() >= n_classes):
        raise InputError(
            f"{name} must be in [0, {n_classes}), got values from {labels.min()} to {labels.max()}"
        )
    return labels


def _scores(values: ArrayLike, name: str, *, allow_empty: bool = False) -> FloatArray:
    """A 1-D finite float array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise InputError(f"{name} is empty; metrics need at least one sample")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} must be finite, got {int(np.sum(~np.isfinite(arr)))} NaN/inf values")
    return arr


def _probs(values: ArrayLike, name: str = "probs") -> FloatArray:
    """A non-empty ``(N, C)`` matrix of finite probabilities in [0, 1], rows summing to 1."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty (N, C) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise InputError(f"{name} must be finite and in [0, 1]; pass softmax probabilities, not logits")
    check_probability_rows(arr, name)
    return arr


def check_probability_rows(arr: np.ndarray, name: str, tol: float = PROB_SUM_TOL) -> None:
    """:class:`InputError` unless every row of the finite ``(N, C)`` ``arr`` is >= 0 and sums to 1.

    The one check of "these are probabilities" that metrics and training share: a row of logits
    passed by mistake fails here with a message that says so.
    """
    if arr.min() < 0:
        raise InputError(
            f"{name} must be >= 0; row {int(np.argmin(arr.min(axis=1)))} has a negative value; "
            "pass softmax probabilities, not logits"
        )
    sums = arr.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if bad.size:
        raise InputError(
            f"{name} rows must sum to 1 (±{tol}); {bad.size} rows do not, e.g. row {int(bad[0])} "
            f"summing to {float(sums[bad[0]]):.6g}; pass softmax probabilities, not logits"
        )


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise InputError(f"expected one entry per sample in every input, got: {got}")


def average_ranks(values: ArrayLike) -> FloatArray:
    """1-based ranks, ties given the mean of the ranks they span: ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``."""
    x = _scores(values, "values", allow_empty=True)
    if x.size == 0:
        return x.copy()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    new_run = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(new_run)  # sorted position where each run of equal values starts
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return ranks


# --------------------------------------------------------------------------------------------------
# Grading


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of exact matches: ``mean(y_true == y_pred)``."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    return float(np.mean(t == p))


def per_class_f1(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> FloatArray:
    """F1 of each class ``c``: ``2 TP_c / (2 TP_c + FP_c + FN_c)``, shape ``(n_classes,)``.

    A class with no true and no predicted sample has an undefined F1 and gets NaN (it is neither
    right nor wrong); a class that is true but never predicted, or predicted but never true, gets 0.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise InputError(f"n_classes must be a positive integer, got {n_classes!r}")
    t, p = _labels(y_true, "y_true", n_classes), _labels(y_pred, "y_pred", n_classes)
    _same_length(y_true=t, y_pred=p)
    tp = np.bincount(t[t == p], minlength=n_classes).astype(np.float64)
    n_true = np.bincount(t, minlength=n_classes).astype(np.float64)
    n_pred = np.bincount(p, minlength=n_classes).astype(np.float64)
    denom = n_true + n_pred  # = 2TP + FP + FN
    f1 = np.full(n_classes, np.nan)
    present = denom > 0
    f1[present] = 2.0 * tp[present] / denom[present]
    return f1


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> float:
    """Unweighted mean of :func:`per_class_f1` over the classes that occur in ``y_true`` or ``y_pred``.

    ``macro_f1 = (1/|K|) * sum_{c in K} F1_c`` with ``K`` = classes having at least one true or
    predicted sample. Excluding absent classes keeps a split with no ``strong`` pairs from being
    penalised for a class it cannot contain.
    """
    f1 = per_class_f1(y_true, y_pred, n_classes)
    return float(np.nanmean(f1))


# --------------------------------------------------------------------------------------------------
# Ranking


def ndcg_at_k(
    query_ids: Sequence[Hashable] | NDArray[Any],
    grades_true: ArrayLike,
    scores: ArrayLike,
    k: int = 10,
    gains: Sequence[float] = GRADE_GAINS,
) -> float:
    """Mean NDCG@k over queries, ranking each query's judged items by ``scores`` (descending).

    ``DCG@k = sum_{r=1..min(k, n)} gains[grade_r] / log2(r + 1)``; ``NDCG@k = DCG@k / IDCG@k`` with
    IDCG from the true grades in ideal order. Score ties keep input order (stable sort on -score).
    Queries with ``IDCG = 0`` (no relevant item) are skipped; if every query is skipped the result
    is NaN (and a warning is logged), since no ranking can be judged.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    gain_table = _scores(gains, "gains")
    grades = _labels(grades_true, "grades_true", len(gain_table))
    s = _scores(scores, "scores")
    qids: list[Any] = query_ids.tolist() if isinstance(query_ids, np.ndarray) else list(query_ids)
    if len(qids) != len(grades) or len(s) != len(grades):
        raise InputError(
            "expected one entry per pair in every input, got "
            f"query_ids {len(qids)}, grades_true {len(grades)}, scores {len(s)}"
        )
    groups: dict[Hashable, list[int]] = {}
    for i, qid in enumerate(qids):
        groups.setdefault(qid, []).append(i)

    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for rows in groups.values():
        idx = np.asarray(rows)
        g = gain_table[grades[idx]]
        ideal = np.sort(g)[::-1][:k]
        idcg = float(ideal @ discounts[: len(ideal)])
        if idcg <= 0.0:
            continue
        ranked = g[np.argsort(-s[idx], kind="stable")][:k]
        values.append(float(ranked @ discounts[: len(ranked)]) / idcg)
    if not values:
        logger.warning("ndcg_at_k: none of %d queries has a relevant item; returning NaN", len(groups))
        return math.nan
    return float(np.mean(values))


def expected_relevance(probs: ArrayLike, gains: Sequence[float] = GRADE_GAINS) -> FloatArray:
    """Expected gain of each pair, ``probs @ gains``: the score that ranks by graded relevance."""
    p = _probs(probs)
    g = _scores(gains, "gains")
    if p.shape[1] != len(g):
        raise InputError(f"probs has {p.shape[1]} grade columns but gains has {len(g)} entries")
    result: FloatArray = p @ g
    return result


# --------------------------------------------------------------------------------------------------
# Calibration


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """ECE of the predicted grade (Guo et al., 2017), equal-width confidence bins on [0, 1].

    ``conf_i = max_c probs[i, c]``, ``pred_i = argmax_c probs[i, c]`` (first on ties); bin ``b``
    holds ``conf in ((b-1)/M, b/M]``; ``ECE = sum_b (|B_b| / N) * |acc(B_b) - mean conf(B_b)|``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")
    p = _probs(probs)
    t = _labels(y_true, "y_true", p.shape[1])
    _same_length(probs=p, y_true=t)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=conf, minlength=n_bins)
    )  # = |B_b| * |acc(B_b) - conf(B_b)|
    return float(gap.sum() / count.sum())


# --------------------------------------------------------------------------------------------------
# OOD detection: positive = out-of-distribution, higher score = more OOD


def auroc(scores_negative: ArrayLike, scores_positive: ArrayLike) -> float:
    """Probability that a random OOD (positive) pair outscores a random ID one, ties counting 1/2.

    Via Mann–Whitney U on average ranks of the pooled scores:
    ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)``.
    """
    neg, pos = _scores(scores_negative, "scores_negative"), _scores(scores_positive, "scores_positive")
    ranks = average_ranks(np.concatenate([neg, pos]))
    n_neg, n_pos = len(neg), len(pos)
    u = float(ranks[n_neg:].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def fpr_at_tpr(scores_negative: ArrayLike, scores_positive: ArrayLike, tpr: float = 0.95) -> float:
    """Share of ID (negative) pairs flagged at the threshold that catches ``tpr`` of OOD pairs.

    ``t`` = the ``ceil(tpr * n_pos)``-th largest positive score (the highest threshold with
    ``mean(pos >= t) >= tpr``); ``FPR = mean(neg >= t)``.
    """
    if not 0.0 < tpr <= 1.0:
        raise InputError(f"tpr must be in (0, 1], got {tpr!r}")
    neg, pos = _scores(scores_negative, "scores_negative"), _scores(scores_positive, "scores_positive")
    # The small slack keeps 0.95 * 20 = 19 from becoming 20 through float rounding.
    n_caught = max(1, math.ceil(tpr * len(pos) - 1e-9))
    threshold = np.sort(pos)[::-1][n_caught - 1]
    return float(np.mean(neg >= threshold))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rho: the Pearson correlation of average ranks (ties share their mean rank).

    NaN when either input is constant (the correlation is undefined).
    """
    x, y = _scores(a, "a"), _scores(b, "b")
    _same_length(a=x, b=y)
    if len(x) < 2:
        raise InputError(f"spearman needs at least 2 samples, got {len(x)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0.0:
        return math.nan
    return float(rx @ ry) / denom


# --------------------------------------------------------------------------------------------------
# Report


def grading_report(
    probs: ArrayLike,
    truth: Sequence[Pair] | ArrayLike,
    query_ids: Sequence[Hashable] | NDArray[Any] | None = None,
    *,
    k: int = 10,
    gains: Sequence[float] = GRADE_GAINS,
    n_bins: int = 15,
    decided: ArrayLike | None = None,
) -> dict[str, float]:
    """``{"macro_f1", "accuracy", "ndcg@10", "ece"}`` of grade probabilities, as plain floats;
    macro-F1 and accuracy from ``decided`` grades when given (a node's corrected decisions), else
    from the probabilities' argmax.

    ``truth`` is either the graded :class:`Pair` s (grades and query ids come from them; a pair
    without ``query_id`` is grouped by its query text) or an array of true grades, in which case
    ``query_ids`` is required. Items are ranked for NDCG by :func:`expected_relevance`.
    """
    p = _probs(probs)
    if isinstance(truth, Sequence) and len(truth) > 0 and isinstance(truth[0], Pair):
        pairs: Sequence[Pair] = truth  # type: ignore[assignment]
        ungraded = [i for i, pair in enumerate(pairs) if pair.grade is None]
        if ungraded:
            raise InputError(f"grading_report needs graded pairs; pair {ungraded[0]} has grade None")
        grades = np.asarray([pair.grade for pair in pairs], dtype=np.int64)
        if query_ids is None:
            query_ids = [pair.query if pair.query_id is None else pair.query_id for pair in pairs]
    else:
        grades = _labels(truth, "grades_true", p.shape[1])  # type: ignore[arg-type]
        if query_ids is None:
            raise InputError("query_ids is required when truth is an array of grades, not pairs")
    _same_length(probs=p, grades_true=grades)
    n_classes = p.shape[1]
    if decided is None:
        y_pred = p.argmax(axis=1)
    else:
        y_pred = _labels(decided, "decided", n_classes)
        _same_length(probs=p, decided=y_pred)
    return {
        "macro_f1": macro_f1(grades, y_pred, n_classes),
        "accuracy": accuracy(grades, y_pred),
        f"ndcg@{k}": ndcg_at_k(query_ids, grades, expected_relevance(p, gains), k=k, gains=gains),
        "ece": expected_calibration_error(p, grades, n_bins=n_bins),
    }
