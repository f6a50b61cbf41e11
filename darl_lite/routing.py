"""Which pairs go to the full LLM: out-of-distribution or uncertain ones, under a budget.

A pair is a candidate when its OOD score exceeds ``ood_threshold`` (the student is out of its
depth) or its top-two grade margin falls below ``margin_threshold`` (the student is unsure).
``max_route_fraction`` caps the share of one call's pairs that may be sent; when more pairs are
candidates, the most urgent ones go (largest excess over either threshold) and the rest keep the
student's answer, flagged as over budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError


@dataclass(frozen=True)
class RoutingPolicy:
    """Thresholds and budget; ``inf`` / ``0`` disable a criterion."""

    ood_threshold: float = float("inf")
    margin_threshold: float = 0.0
    max_route_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_route_fraction <= 1.0:
            raise InputError(f"max_route_fraction must lie in [0, 1], got {self.max_route_fraction}")
        if not 0.0 <= self.margin_threshold <= 1.0:
            raise InputError(f"margin_threshold must lie in [0, 1], got {self.margin_threshold}")
        if np.isnan(self.ood_threshold):
            raise InputError("ood_threshold must be a number, got NaN")

    @classmethod
    def from_manifest(
        cls, manifest: Mapping[str, Any], precision: str, **overrides: float | None
    ) -> RoutingPolicy:
        """The bundle's defaults for the model of ``precision``, with any non-None override applied."""
        routing = manifest.get("routing", {})
        thresholds = manifest.get("ood", {}).get("thresholds", {})
        values = {
            "ood_threshold": float(thresholds.get(precision, float("inf"))),
            "margin_threshold": float(routing.get("margin_threshold", 0.0)),
            "max_route_fraction": float(routing.get("max_route_fraction", 1.0)),
        }
        values.update({k: float(v) for k, v in overrides.items() if v is not None})
        return cls(**values)

    def urgency(
        self, probabilities: NDArray[np.floating], ood_scores: NDArray[np.floating]
    ) -> NDArray[np.float64]:
        """How far each pair lies past either threshold, relative to it; > 0 makes it a candidate.

        ``max(ood / ood_threshold - 1, (margin_threshold - margin) / margin_threshold)``, where the
        margin is the gap between the two most probable grades.
        """
        probs = np.asarray(probabilities, np.float64)
        if len(probs) == 0:
            return np.zeros(0)
        top2 = np.sort(probs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        score: NDArray[np.float64] = (self.margin_threshold - margin) / max(self.margin_threshold, 1e-12)
        if np.isfinite(self.ood_threshold):
            score = np.maximum(score, np.asarray(ood_scores, np.float64) / self.ood_threshold - 1.0)
        return score

    def decide(
        self, probabilities: NDArray[np.floating], ood_scores: NDArray[np.floating]
    ) -> RoutingDecision:
        """Candidates and the routed subset for one call's pairs: the most urgent within budget."""
        urgency = self.urgency(probabilities, ood_scores)
        candidate = urgency > 0.0
        budget = int(np.floor(self.max_route_fraction * len(urgency) + 1e-9))
        routed = candidate
        if candidate.sum() > budget:
            keep = np.argsort(-np.where(candidate, urgency, -np.inf), kind="stable")[:budget]
            routed = np.zeros(len(urgency), bool)
            routed[keep] = True
        return RoutingDecision(candidate=candidate, routed=routed)


@dataclass(frozen=True)
class RoutingDecision:
    candidate: NDArray[np.bool_]  # the policy wanted the LLM
    routed: NDArray[np.bool_]  # and the budget allowed it
