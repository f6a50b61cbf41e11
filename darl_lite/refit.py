"""Fit a bundle's routing to a user's own traffic: ``darl-lite refit-routing``.

A user with a new domain gives a few hundred of their own graded pairs and the teacher's grades for
them (a teacher file, e.g. from ``darl-lite distill label``). Their queries become a new kind of
shift (domain classifier: the bundle's reference queries vs theirs, plus any unlabeled queries of
theirs); on their graded pairs the refit measures whether the teacher beats the student, as whole
lists and pair by pair, and writes a new, re-hashed bundle that routes their traffic only where it
pays. The gain curve it saw (quality against the share of pairs sent, router vs random) comes back
with the bundle, so the choice can be checked. Torch-free: a node can refit itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from darl_lite.cascade_fit import fit_shift_kind, graded_evidence, write_with_shift_routing
from darl_lite.errors import BundleError, InputError
from darl_lite.route_curve import node_route_curve
from darl_lite.scorer import Scorer
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: Fewer graded queries than this and the evidence is too thin to route on; the refit says so.
MIN_QUERIES = 5


@dataclass(frozen=True)
class RefitReport:
    """What a refit saw and decided."""

    bundle_dir: str
    kind: dict[str, Any]  # the new kind's decisions and evidence
    curve: list[dict[str, Any]]  # per-pair routing on the user's pairs: router vs random by route rate


def refit_routing(
    bundle_dir: str | os.PathLike[str],
    pairs: Sequence[Pair],
    teacher_probs: Any,
    out_dir: str | os.PathLike[str],
    *,
    kind_name: str = "user traffic",
    unlabeled_queries: Sequence[str] = (),
    overwrite: bool = False,
    seed: int = 0,
) -> RefitReport:
    """Refit the routing of the bundle at ``bundle_dir`` on graded ``pairs`` (see the module docstring)."""
    graded = [p for p in pairs if p.grade is not None]
    if len(graded) != len(pairs):
        raise InputError(
            f"refit needs graded pairs; {len(pairs) - len(graded)} of {len(pairs)} have no grade"
        )
    teacher = np.asarray(teacher_probs, np.float64)
    if teacher.shape[0] != len(pairs):
        raise InputError(f"{len(pairs)} pairs but {teacher.shape[0]} teacher rows")
    n_queries = len({p.query for p in pairs})
    if n_queries < MIN_QUERIES:
        raise InputError(
            f"refit needs graded pairs of at least {MIN_QUERIES} distinct queries to measure a gain; "
            f"got {n_queries}. Grade more of your traffic (a few hundred pairs over tens of queries)"
        )
    scorer = Scorer.load(bundle_dir)
    shift = scorer.shift
    if shift is None or not shift.reference_queries:
        raise BundleError(
            f"{bundle_dir} carries no shift routing with reference queries; re-export it with this "
            "darl-lite release (the quickstart and `darl-lite export` write one)"
        )
    queries = [p.query for p in pairs]
    grades = [int(p.grade) for p in pairs if p.grade is not None]
    # every decision is fitted on the answer the bundle serves for a routed pair
    evidence = graded_evidence(scorer, queries, [p.item for p in pairs], grades, teacher).answered_with(
        shift.teacher_weight
    )
    kind = fit_shift_kind(
        kind_name,
        reference_queries=shift.reference_queries,
        pool_queries=sorted({*queries, *unlabeled_queries}),
        evidence=evidence,
        error_threshold=scorer.routing.error_threshold,
        pair_margin_threshold=shift.pair_margin_threshold,
        seed=seed,
    )
    refitted = shift.with_kind(kind)  # keeps the in-distribution correction
    curve = node_route_curve(  # pairs routed one by one as the refitted node routes them
        evidence.student_logits,
        np.zeros(len(pairs)),
        evidence.teacher_probs,
        evidence.grades,
        queries,
        temperature=scorer.temperature,
        policy=scorer.routing,
        shift=refitted,
        gains=scorer.bundle.grade_gains,
        seed=seed,
        random_repeats=5,
    )
    bundle = write_with_shift_routing(scorer.bundle, refitted, str(out_dir), overwrite=overwrite)
    logger.info(
        "refit %s -> %s: kind %r: %s", bundle_dir, bundle.directory, kind.name, kind.evidence["decision"]
    )
    summary = next(k for k in refitted.summary() if k["name"] == kind.name)
    return RefitReport(str(bundle.directory), summary, curve)


__all__ = ["MIN_QUERIES", "RefitReport", "refit_routing"]
