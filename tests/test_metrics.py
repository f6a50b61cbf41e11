"""Metrics against values worked out by hand, plus identities that need no reference library."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darl_lite.errors import InputError
from darl_lite.metrics import (
    accuracy,
    auroc,
    average_ranks,
    expected_calibration_error,
    expected_relevance,
    fpr_at_tpr,
    grading_report,
    macro_f1,
    ndcg_at_k,
    per_class_f1,
    spearman,
)
from darl_lite.types import Pair

LOG2_3 = math.log2(3)


# ------------------------------------------------------------------------------------------- grading


def test_accuracy_by_hand() -> None:
    # matches at positions 0 and 2 of 4
    assert accuracy([0, 1, 2, 2], [0, 2, 2, 1]) == 0.5


def test_per_class_f1_and_macro_by_hand() -> None:
    y_true = [0, 0, 1, 2, 2]
    y_pred = [0, 1, 1, 2, 0]
    # class 0: TP=1, true=2, pred=2 -> 2*1/(2+2) = 0.5
    # class 1: TP=1, true=1, pred=2 -> 2/3
    # class 2: TP=1, true=2, pred=1 -> 2/3
    # class 3: never true, never predicted -> undefined (NaN), excluded from the macro average
    f1 = per_class_f1(y_true, y_pred, n_classes=4)
    np.testing.assert_allclose(f1[:3], [0.5, 2 / 3, 2 / 3])
    assert math.isnan(f1[3])
    assert macro_f1(y_true, y_pred, n_classes=4) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    # The absent class does not change the result.
    assert macro_f1(y_true, y_pred, n_classes=3) == pytest.approx(macro_f1(y_true, y_pred, n_classes=4))


def test_macro_f1_counts_a_class_that_is_never_predicted_as_zero() -> None:
    # class 0: TP=1, true=1, pred=2 -> 2/3; class 1: true once, never predicted -> 0
    assert macro_f1([0, 1], [0, 0], n_classes=2) == pytest.approx(1 / 3)
    assert macro_f1([0, 1, 2], [0, 1, 2], n_classes=3) == 1.0


def test_grading_metrics_reject_bad_input() -> None:
    with pytest.raises(InputError, match="y_true has 3, y_pred has 2"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(InputError, match="empty"):
        macro_f1([], [], n_classes=3)
    with pytest.raises(InputError, match=r"must be in \[0, 3\), got values from 0 to 3"):
        macro_f1([0, 3], [0, 1], n_classes=3)
    with pytest.raises(InputError, match="integer labels"):
        accuracy([0.5, 1.0], [0, 1])


# ------------------------------------------------------------------------------------------- ranking


def test_ndcg_single_query_by_hand() -> None:
    # ranking by score: grades 2, 0, 1 -> DCG = 2/log2(2) + 0/log2(3) + 1/log2(4) = 2.5
    # ideal order 2, 1, 0           -> IDCG = 2 + 1/log2(3)
    value = ndcg_at_k(["q", "q", "q"], [2, 0, 1], [0.9, 0.8, 0.1])
    assert value == pytest.approx(2.5 / (2 + 1 / LOG2_3))
    # at k=1 only the top item counts, and it is the best one
    assert ndcg_at_k(["q", "q", "q"], [2, 0, 1], [0.9, 0.8, 0.1], k=1) == 1.0


def test_ndcg_breaks_score_ties_by_input_order() -> None:
    # equal scores keep input order: grades 0, 2 -> DCG = 2/log2(3); IDCG = 2 -> 1/log2(3)
    assert ndcg_at_k(["q", "q"], [0, 2], [0.5, 0.5]) == pytest.approx(1 / LOG2_3)
    assert ndcg_at_k(["q", "q"], [2, 0], [0.5, 0.5]) == 1.0


def test_ndcg_skips_queries_without_relevant_items_and_averages_the_rest() -> None:
    # a: grades 1, 0 ranked 0 first -> DCG = 1/log2(3), IDCG = 1 -> 1/log2(3)
    # b: all irrelevant -> IDCG = 0, skipped
    # c: a single strong item -> 1
    value = ndcg_at_k(["a", "a", "b", "b", "c"], [1, 0, 0, 0, 2], [0.0, 1.0, 0.3, 0.2, 0.5])
    assert value == pytest.approx((1 / LOG2_3 + 1.0) / 2)
    assert math.isnan(ndcg_at_k(["b", "b"], [0, 0], [0.1, 0.2]))


def test_ndcg_identities_perfect_and_reversed() -> None:
    rng = np.random.default_rng(0)
    qids = np.repeat(np.arange(20), 15)
    grades = rng.integers(0, 3, size=len(qids))
    grades[::15] = 2  # every query has a relevant item
    assert ndcg_at_k(qids, grades, grades.astype(float)) == pytest.approx(1.0)
    assert ndcg_at_k(qids, grades, -grades.astype(float)) < 0.9
    # order of queries in the input does not matter
    perm = rng.permutation(len(qids))
    scores = rng.normal(size=len(qids))
    assert ndcg_at_k(qids[perm], grades[perm], scores[perm]) == pytest.approx(ndcg_at_k(qids, grades, scores))


def test_ndcg_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="query_ids 2, grades_true 3, scores 3"):
        ndcg_at_k(["q", "q"], [0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match=r"in \[0, 3\)"):
        ndcg_at_k(["q"], [3], [0.1])
    with pytest.raises(InputError, match="finite"):
        ndcg_at_k(["q", "q"], [0, 1], [0.1, float("nan")])
    with pytest.raises(InputError, match="k must be a positive integer"):
        ndcg_at_k(["q"], [1], [0.1], k=0)


def test_expected_relevance_is_probs_times_gains() -> None:
    # 0.2*0 + 0.3*1 + 0.5*2 = 1.3; 1*0 = 0
    np.testing.assert_allclose(expected_relevance([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]), [1.3, 0.0])
    with pytest.raises(InputError, match="3 grade columns but gains has 2"):
        expected_relevance([[0.2, 0.3, 0.5]], gains=(0.0, 1.0))


# --------------------------------------------------------------------------------------- calibration


def test_ece_each_sample_in_its_own_bin() -> None:
    probs = [[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.25, 0.7, 0.05]]
    y_true = [0, 1, 2, 1]
    # conf 0.9 right, 0.6 wrong, 0.5 right, 0.7 right; 10 bins put each in a different bin
    # ECE = (|1-0.9| + |0-0.6| + |1-0.5| + |1-0.7|) / 4 = 1.5 / 4
    assert expected_calibration_error(probs, y_true, n_bins=10) == pytest.approx(0.375)


def test_ece_samples_sharing_a_bin() -> None:
    # conf 0.8 and 0.75 both fall in (0.6, 0.8] with 5 bins; accuracy 1/2, mean conf 0.775
    assert expected_calibration_error([[0.8, 0.2], [0.75, 0.25]], [0, 1], n_bins=5) == pytest.approx(0.275)
    # confident and right: perfectly calibrated
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0


def test_ece_rejects_logits_and_bad_shapes() -> None:
    with pytest.raises(InputError, match="not logits"):
        expected_calibration_error([[2.0, -1.0]], [0])
    with pytest.raises(InputError, match=r"row 1 summing to 0\.5"):
        expected_calibration_error([[0.5, 0.5], [0.25, 0.25]], [0, 1])
    with pytest.raises(InputError, match=r"\(N, C\) matrix, got shape \(2,\)"):
        expected_calibration_error([0.5, 0.5], [0, 1])
    with pytest.raises(InputError, match="probs has 2, y_true has 1"):
        expected_calibration_error([[0.5, 0.5], [0.5, 0.5]], [0])


# ----------------------------------------------------------------------------------------------- OOD


def test_average_ranks_share_ties() -> None:
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(average_ranks([3, 1, 2, 1, 1]), [5, 2, 4, 2, 2])


def test_auroc_by_hand_with_a_tie() -> None:
    neg = [0.1, 0.4, 0.35, 0.8]
    pos = [0.9, 0.4, 0.6]
    # 0.9 beats all 4; 0.4 beats 0.1 and 0.35, ties 0.4 (1/2), loses to 0.8 -> 2.5; 0.6 beats 3
    assert auroc(neg, pos) == pytest.approx((4 + 2.5 + 3) / 12)


def test_auroc_identities() -> None:
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    rng = np.random.default_rng(1)
    same = rng.normal(size=50)
    assert auroc(same, same) == pytest.approx(0.5)
    with pytest.raises(InputError, match="scores_positive is empty"):
        auroc([1.0], [])


def test_fpr_at_tpr_by_hand() -> None:
    pos = np.arange(1.0, 21.0)  # 20 OOD scores 1..20
    neg = [0.0, 1.5, 2.0, 3.0]
    # catching 95% = 19 of 20 needs threshold 2 (the 19th largest); ID scores >= 2: 2.0, 3.0
    assert fpr_at_tpr(neg, pos, tpr=0.95) == 0.5
    # catching all needs threshold 1; ID scores >= 1: 1.5, 2.0, 3.0
    assert fpr_at_tpr(neg, pos, tpr=1.0) == 0.75
    assert fpr_at_tpr([0.0, 0.5], [1.0, 2.0]) == 0.0
    with pytest.raises(InputError, match=r"tpr must be in \(0, 1\]"):
        fpr_at_tpr(neg, pos, tpr=0.0)


def test_spearman_by_hand() -> None:
    # no ties: d = (0, 1, 1, 0) -> rho = 1 - 6*2 / (4*(16-1)) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4); centred dot 4.5, norms sqrt(4.5) and sqrt(5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(InputError, match="at least 2"):
        spearman([1], [1])


# -------------------------------------------------------------------------------------------- report


def _report_case() -> tuple[np.ndarray, list[Pair]]:
    probs = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3]])
    pairs = [
        Pair("q1", "a", 2, "1"),
        Pair("q1", "b", 0, "1"),
        Pair("q2", "c", 1, "2"),
        Pair("q2", "d", 0, "2"),
    ]
    return probs, pairs


def test_grading_report_by_hand() -> None:
    probs, pairs = _report_case()
    report = grading_report(probs, pairs)
    # predicted 2, 0, 1, 1 vs true 2, 0, 1, 0 -> accuracy 3/4
    # F1: class 0 TP1 true2 pred1 -> 2/3; class 1 TP1 true1 pred2 -> 2/3; class 2 -> 1
    # expected relevance 1.6, 0.5 (q1) and 1.1, 0.9 (q2): both queries ranked ideally -> NDCG 1
    # conf 0.7, 0.6, 0.5, 0.4 in separate bins: (0.3 + 0.4 + 0.5 + |0 - 0.4|) / 4 = 0.4
    assert report == pytest.approx(
        {"macro_f1": (2 / 3 + 2 / 3 + 1) / 3, "accuracy": 0.75, "ndcg@10": 1.0, "ece": 0.4}
    )
    assert all(type(v) is float for v in report.values())
    from_arrays = grading_report(probs, np.array([2, 0, 1, 0]), ["1", "1", "2", "2"])
    assert from_arrays == report


def test_grading_report_rejects_missing_query_ids_and_ungraded_pairs() -> None:
    probs, pairs = _report_case()
    with pytest.raises(InputError, match="query_ids is required"):
        grading_report(probs, [2, 0, 1, 0])
    with pytest.raises(InputError, match="pair 0 has grade None"):
        grading_report(probs, [Pair("q", "a"), *pairs[1:]])
    with pytest.raises(InputError, match="probs has 4, grades_true has 3"):
        grading_report(probs, pairs[:3])
