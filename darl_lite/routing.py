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

    def decide(
        self, probabilities: NDArray[np.floating], ood_scores: NDArray[np.floating]
    ) -> RoutingDecision:
        """Candidates and the routed subset for one call's pairs."""
        n = len(ood_scores)
        if n == 0:
            empty = np.zeros(0, bool)
            return RoutingDecision(empty, empty)
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        ood_excess = ood_scores / self.ood_threshold - 1.0 if np.isfinite(self.ood_threshold) else None
        margin_excess = (self.margin_threshold - margin) / max(self.margin_threshold, 1e-12)
        candidate = margin < self.margin_threshold
        if ood_excess is not None:
            candidate |= ood_excess > 0.0
        budget = int(np.floor(self.max_route_fraction * n + 1e-9))
        routed = candidate.copy()
        if candidate.sum() > budget:
            urgency = margin_excess if ood_excess is None else np.maximum(ood_excess, margin_excess)
            urgency = np.where(candidate, urgency, -np.inf)
            keep = np.argsort(-urgency, kind="stable")[:budget]
            routed = np.zeros(n, bool)
            routed[keep] = True
        return RoutingDecision(candidate=candidate, routed=routed)


@dataclass(frozen=True)
class RoutingDecision:
    candidate: NDArray[np.bool_]  # the policy wanted the LLM
    routed: NDArray[np.bool_]  # and the budget allowed it
