"""Which pairs go to the full LLM: the ones the student most likely gets wrong, under a budget.

Two rules, named in the manifest's ``routing.rule``:

``expected_error`` (the default of a bundle's policy, :meth:`RoutingPolicy.from_manifest`)
    urgency = ``(1 - max p) - error_threshold``: the calibrated probability that the student's grade
    is wrong, past a threshold. Measured on the shipped dev splits, this finds the pairs where the
    teacher would change the answer; the OOD score does not (the most out-of-distribution pairs are
    mostly irrelevant items that student and teacher both grade 0, so routing them buys nothing). The
    OOD score still comes with every result, for monitoring.
``threshold_excess`` (the first rule)
    urgency = the larger relative excess over ``ood_threshold`` or below ``margin_threshold``.

A policy built by hand takes the bundle's rule, ``expected_error``, unless it sets
``margin_threshold`` or ``ood_threshold`` (the thresholds of ``threshold_excess``, which it then
takes, so ``RoutingPolicy(margin_threshold=1.0)`` keeps its meaning); name ``rule`` to choose.

A pair is a candidate when its urgency is > 0. ``max_route_fraction`` caps the share of one call's
pairs that may be sent; when more pairs are candidates, the most urgent go and the rest keep the
student's answer, flagged as over budget. :class:`darl_lite.budget.RouteBudget` adds a cap over a
sliding time window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError

RoutingRule = Literal["expected_error", "threshold_excess"]
ROUTING_RULES: tuple[str, ...] = ("expected_error", "threshold_excess")


@dataclass(frozen=True)
class RoutingPolicy:
    """Rule, thresholds and per-call budget; ``inf`` / ``0`` / ``1`` disable a threshold."""

    ood_threshold: float = float("inf")
    margin_threshold: float = 0.0
    max_route_fraction: float = 1.0
    #: ``"auto"`` resolves at construction (see the module docstring); the field then holds the rule.
    rule: RoutingRule | Literal["auto"] = "auto"
    #: Route when the student's probability of being wrong (1 - max p) exceeds this.
    error_threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.rule == "auto":
            excess = self.margin_threshold != 0.0 or self.ood_threshold != float("inf")
            if excess and self.error_threshold != 1.0:
                raise InputError(
                    "RoutingPolicy got error_threshold (rule expected_error) and margin/ood thresholds "
                    "(rule threshold_excess); pass rule=... to say which rule to use"
                )
            object.__setattr__(self, "rule", "threshold_excess" if excess else "expected_error")
        if not 0.0 <= self.max_route_fraction <= 1.0:
            raise InputError(f"max_route_fraction must lie in [0, 1], got {self.max_route_fraction}")
        if not 0.0 <= self.margin_threshold <= 1.0:
            raise InputError(f"margin_threshold must lie in [0, 1], got {self.margin_threshold}")
        if not 0.0 <= self.error_threshold <= 1.0:
            raise InputError(f"error_threshold must lie in [0, 1], got {self.error_threshold}")
        if np.isnan(self.ood_threshold):
            raise InputError("ood_threshold must be a number, got NaN")
        if self.rule not in ROUTING_RULES:
            raise InputError(f"routing rule must be one of {ROUTING_RULES}, got {self.rule!r}")

    @classmethod
    def from_manifest(
        cls, manifest: Mapping[str, Any], precision: str, **overrides: float | str | None
    ) -> RoutingPolicy:
        """The bundle's defaults for the model of ``precision``, with any non-None override applied.

        The rule is ``routing.rule`` (default ``expected_error``). A manifest without
        ``routing.error_threshold`` gets ``(1 - margin_threshold) / 2`` (1, routing nothing, when the
        margin threshold is absent or 0): with two grades in play,
        ``margin < m`` is exactly ``1 - max p > (1 - m) / 2``, so the bundle's uncertainty threshold
        carries over and the route rate stays comparable.
        """
        routing = manifest.get("routing", {})
        thresholds = manifest.get("ood", {}).get("thresholds", {})
        values: dict[str, Any] = {
            "ood_threshold": float(thresholds.get(precision, float("inf"))),
            "margin_threshold": float(routing.get("margin_threshold", 0.0)),
            "max_route_fraction": float(routing.get("max_route_fraction", 1.0)),
            "rule": str(routing.get("rule", "expected_error")),
            "error_threshold": float(routing.get("error_threshold", _error_threshold_from_margin(routing))),
        }
        for key, value in overrides.items():
            if value is not None:
                values[key] = value if key == "rule" else float(value)
        return cls(**values)

    def urgency(
        self, probabilities: NDArray[np.floating], ood_scores: NDArray[np.floating]
    ) -> NDArray[np.float64]:
        """How far each pair lies past the rule's threshold; > 0 makes it a candidate, larger goes first."""
        probs = np.asarray(probabilities, np.float64)
        if len(probs) == 0:
            return np.zeros(0)
        if self.rule == "expected_error":
            result: NDArray[np.float64] = (1.0 - probs.max(axis=1)) - self.error_threshold
            return result
        top2 = np.sort(probs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        score: NDArray[np.float64] = (self.margin_threshold - margin) / max(self.margin_threshold, 1e-12)
        if np.isfinite(self.ood_threshold):
            score = np.maximum(score, np.asarray(ood_scores, np.float64) / self.ood_threshold - 1.0)
        return score

    def decide(
        self,
        probabilities: NDArray[np.floating],
        ood_scores: NDArray[np.floating],
        allowed: NDArray[np.bool_] | None = None,
        *,
        urgency: NDArray[np.floating] | None = None,
    ) -> RoutingDecision:
        """Candidates and the routed subset for one call's pairs: the most urgent within budget.

        ``allowed`` masks the pairs this policy may consider (the others are already decided, e.g.
        sent as a whole shifted list); the per-call cap still counts every pair of the call.
        ``urgency`` replaces the rule's own (e.g. the shift routing's corrected decision margins,
        :meth:`darl_lite.shift_routing.ShiftRouting.pair_urgency`); the cap applies as before.
        """
        given = self.urgency(probabilities, ood_scores) if urgency is None else urgency
        scores: NDArray[np.float64] = np.asarray(given, np.float64)
        if scores.shape != (len(probabilities),):
            raise InputError(f"urgency has shape {scores.shape}; expected ({len(probabilities)},)")
        candidate = scores > 0.0 if allowed is None else (scores > 0.0) & allowed
        budget = int(np.floor(self.max_route_fraction * len(scores) + 1e-9))
        routed = candidate
        if candidate.sum() > budget:
            routed = most_urgent(scores, candidate, budget)
        return RoutingDecision(candidate=candidate, routed=routed, urgency=scores)


def _error_threshold_from_margin(routing: Mapping[str, Any]) -> float:
    margin = float(routing.get("margin_threshold", 0.0))
    return (1.0 - margin) / 2.0 if margin > 0.0 else 1.0  # margin 0 disabled routing: so does 1.0


def most_urgent(urgency: NDArray[np.floating], allowed: NDArray[np.bool_], k: int) -> NDArray[np.bool_]:
    """A mask of the ``k`` most urgent pairs among ``allowed`` (ties: input order)."""
    keep = np.argsort(-np.where(allowed, urgency, -np.inf), kind="stable")[
        : max(0, min(k, int(allowed.sum())))
    ]
    mask = np.zeros(len(urgency), bool)
    mask[keep] = True
    return mask


def error_threshold_for_rate(probabilities: NDArray[np.floating], rate: float) -> float:
    """The ``error_threshold`` that makes a share ``rate`` of these (dev) pairs candidates.

    Fit on dev data, never test data, and store it in the manifest's ``routing.error_threshold``.
    """
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"rate must lie in [0, 1], got {rate}")
    errors = 1.0 - np.asarray(probabilities, np.float64).max(axis=1)
    if len(errors) == 0:
        raise InputError("error_threshold_for_rate needs at least one dev pair")
    if rate == 0.0:
        return 1.0
    return float(min(1.0, max(0.0, np.quantile(errors, 1.0 - rate, method="higher") - 1e-12)))


@dataclass(frozen=True)
class RoutingDecision:
    candidate: NDArray[np.bool_]  # the policy wanted the LLM
    routed: NDArray[np.bool_]  # and the budget allowed it
    urgency: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))


__all__: Sequence[str] = [
    "ROUTING_RULES",
    "RoutingDecision",
    "RoutingPolicy",
    "RoutingRule",
    "error_threshold_for_rate",
    "most_urgent",
]
