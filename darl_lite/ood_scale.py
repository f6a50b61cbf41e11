"""A scale for the OOD score: the share of in-distribution dev pairs that score lower.

The raw score is a squared Mahalanobis distance whose size depends on the model (180–281 on three
items of one bundle means nothing to a reader). At export the bundle stores a quantile table of the
in-distribution dev pairs' scores (``manifest["ood"]["id_quantiles"][precision]``, 101 values: the
0th to 100th percentile); at run time a score's *percentile* is its position in that table, read
by linear interpolation: 0.5 means half the in-distribution dev pairs scored lower, 0.99 that the
pair is further out than 99% of them. Bundles exported before the table existed give ``None``
(nothing is guessed); re-exporting the bundle adds the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import BundleError

#: Points of the stored quantile table: the 0th, 1st, ..., 100th percentile.
QUANTILE_POINTS = 101


def id_quantile_table(id_scores: NDArray[np.floating], points: int = QUANTILE_POINTS) -> list[float]:
    """The quantile table of in-distribution scores that the manifest stores (``points`` values)."""
    scores = np.asarray(id_scores, dtype=np.float64)
    if scores.size == 0:
        raise BundleError("cannot build an OOD quantile table from zero in-distribution scores")
    return [float(q) for q in np.quantile(scores, np.linspace(0.0, 1.0, points))]


class OODScale:
    """Maps raw OOD scores to percentiles of the in-distribution dev scores (see the module doc)."""

    def __init__(self, quantiles: list[float] | tuple[float, ...]) -> None:
        table = np.asarray(quantiles, dtype=np.float64)
        if table.ndim != 1 or table.size < 2 or not np.all(np.isfinite(table)):
            raise BundleError(f"the OOD quantile table needs >= 2 finite values, got {table.size}")
        if np.any(np.diff(table) < 0):
            raise BundleError("the OOD quantile table must be sorted ascending; re-export the bundle")
        self.quantiles = table
        self.levels = np.linspace(0.0, 1.0, table.size)
        # np.interp needs strictly increasing x-points for a well-defined answer on flat stretches:
        # keep the last level of each run of equal quantiles (once, not per call).
        keep = np.append(np.diff(table) > 0, True)
        self._points, self._levels = table[keep], self.levels[keep]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], precision: str) -> OODScale | None:
        """The scale a bundle carries for ``precision``, or None for a bundle exported without it."""
        table = manifest.get("ood", {}).get("id_quantiles", {}).get(precision)
        return None if table is None else cls(table)

    def percentiles(self, scores: NDArray[np.floating] | Sequence[float]) -> NDArray[np.float64]:
        """Share of in-distribution dev pairs scoring lower, in [0, 1], one per score.

        Ties (a flat stretch of the table, e.g. many equal scores) resolve to the highest level of
        the stretch below the score, so equal raw scores always give equal percentiles.
        """
        x = np.asarray(scores, dtype=np.float64)
        return np.interp(x, self._points, self._levels, left=0.0, right=1.0)


__all__ = ["QUANTILE_POINTS", "OODScale", "id_quantile_table"]
