"""OOD maths against hand values, and the routing policy's candidates and budget."""

from __future__ import annotations

import numpy as np
import pytest

from darl_lite import InputError, RoutingPolicy
from darl_lite.ood import MahalanobisDetector, threshold_for_coverage


def test_mahalanobis_against_hand_values() -> None:
    # Means (0,0) and (4,0); precision diag(1, 1/4).
    detector = MahalanobisDetector(means=np.array([[0.0, 0.0], [4.0, 0.0]]), precision=np.diag([1.0, 0.25]))
    # (1,2): to class 0: 1*1 + 0.25*4 = 2; to class 1: 9 + 1 = 10 -> 2.
    # (3,0): to class 0: 9; to class 1: 1 -> 1.   (2,4): 4 + 4 = 8 both -> 8.
    np.testing.assert_allclose(
        detector.score(np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])), [2.0, 1.0, 8.0]
    )


def test_fit_recovers_class_means_and_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    x0 = rng.multivariate_normal([0, 0], cov, 20_000)
    x1 = rng.multivariate_normal([5, 5], cov, 20_000)
    detector = MahalanobisDetector.fit(np.vstack([x0, x1]), np.repeat([0, 1], 20_000), shrinkage=0.0)
    np.testing.assert_allclose(detector.means, [[0, 0], [5, 5]], atol=0.05)
    np.testing.assert_allclose(np.linalg.inv(detector.precision), cov, atol=0.05)
    # Squared Mahalanobis distances of in-distribution points follow chi2(2): mean 2, 95% below 5.99.
    scores = detector.score(x0[:5000])
    assert scores.mean() == pytest.approx(2.0, abs=0.1)
    assert threshold_for_coverage(scores, 0.95) == pytest.approx(5.99, abs=0.3)


def test_threshold_validation() -> None:
    with pytest.raises(InputError, match="coverage must lie in"):
        threshold_for_coverage(np.ones(3), 1.5)
    with pytest.raises(InputError, match="zero in-distribution"):
        threshold_for_coverage(np.zeros(0))


def test_routing_candidates_and_urgency_under_budget() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.45, 0.4, 0.15], [0.8, 0.1, 0.1], [0.34, 0.33, 0.33]])
    ood = np.array([1.0, 1.0, 30.0, 1.0])
    # Margins: 0.85, 0.05, 0.7, 0.01. Candidates: pair 1 and 3 (margin < 0.1), pair 2 (ood > 10).
    policy = RoutingPolicy(ood_threshold=10.0, margin_threshold=0.1, max_route_fraction=1.0)
    decision = policy.decide(probs, ood)
    assert decision.candidate.tolist() == [False, True, True, True]
    assert decision.routed.tolist() == [False, True, True, True]
    # Budget of 2 of 4: urgencies 0.5 (pair 1), 2.0 (pair 2, 30/10-1), 0.9 (pair 3) -> pairs 2 and 3.
    tight = RoutingPolicy(ood_threshold=10.0, margin_threshold=0.1, max_route_fraction=0.5)
    assert tight.decide(probs, ood).routed.tolist() == [False, False, True, True]


def test_routing_policy_validation_and_manifest_overrides() -> None:
    with pytest.raises(InputError, match="max_route_fraction"):
        RoutingPolicy(max_route_fraction=1.5)
    manifest = {
        "ood": {"thresholds": {"int8": 12.0}},
        "routing": {"margin_threshold": 0.2, "max_route_fraction": 0.3},
    }
    policy = RoutingPolicy.from_manifest(manifest, "int8", max_route_fraction=0.1)
    # No routing.error_threshold: (1 - margin_threshold) / 2 carries the uncertainty threshold over.
    assert policy == RoutingPolicy(
        ood_threshold=12.0,
        margin_threshold=0.2,
        max_route_fraction=0.1,
        rule="expected_error",
        error_threshold=0.4,
    )
    assert RoutingPolicy.from_manifest(manifest, "fp32").ood_threshold == float("inf")
    old = RoutingPolicy.from_manifest(manifest, "int8", rule="threshold_excess", error_threshold=0.25)
    assert (old.rule, old.error_threshold) == ("threshold_excess", 0.25)
    assert RoutingPolicy.from_manifest({}, "int8").error_threshold == 1.0  # nothing configured: no routing
    with pytest.raises(InputError, match="routing rule"):
        RoutingPolicy(rule="fastest")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="error_threshold"):
        RoutingPolicy(error_threshold=-0.1)


def test_expected_error_rule_routes_the_likely_wrong_not_the_ood() -> None:
    """The default rule of a bundle: urgency = (1 - max p) - error_threshold; OOD does not enter."""
    probs = np.array([[0.9, 0.05, 0.05], [0.45, 0.4, 0.15], [0.8, 0.1, 0.1], [0.34, 0.33, 0.33]])
    ood = np.array([1.0, 1.0, 30.0, 1.0])
    policy = RoutingPolicy(
        ood_threshold=10.0, rule="expected_error", error_threshold=0.5, max_route_fraction=0.25
    )
    np.testing.assert_allclose(policy.urgency(probs, ood), [-0.4, 0.05, -0.3, 0.16])
    decision = policy.decide(probs, ood)
    assert decision.candidate.tolist() == [False, True, False, True]
    assert decision.routed.tolist() == [False, False, False, True]  # budget 1 of 4: the most unsure
