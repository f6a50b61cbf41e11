"""Query-level shift detection: is this request's query the kind of traffic the student was trained on?

The shift that hurts the student on the shipped data is one of *style* (natural-language questions
instead of keyword queries), which density on generic semantic features misses or even inverts.
A **domain classifier** is the standard detector for a shift some unlabeled traffic has already
shown: a logistic regression on the query's words separates the training queries from the queries
of an unlabeled pool of shifted traffic (``ood_train``), and its probability says how much a new
query looks like that pool. It reads the query alone (lower-cased words and punctuation, and the
query's length), so every pair of a request gets the same answer and the cost is a regex and a few
dictionary look-ups per distinct query: no extra model pass.

A shift that no pool has shown (another domain) is the density detector's job
(:class:`darl_lite.ood.MahalanobisDetector`, averaged over a query's pairs by :func:`query_means`).

The detector is fitted at export (:func:`fit_query_shift`) and stored in the bundle as JSON.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import BundleError, InputError

_TOKEN = re.compile(r"\w+|[^\w\s]")
FORMAT = "darl-lite/query-shift-logreg/1"


def query_tokens(query: str) -> list[str]:
    """Lower-cased words and single punctuation marks: the question mark is a strong signal of style."""
    return _TOKEN.findall(query.lower())


@dataclass(frozen=True)
class QueryShiftDetector:
    """P(the query comes from the shifted pool rather than the training traffic): a logistic model.

    ``logit = bias + length_weight · log(1 + n_tokens) + Σ weights[t]`` over the query's distinct
    tokens; tokens absent from ``weights`` add nothing.
    """

    weights: Mapping[str, float]
    length_weight: float
    bias: float
    l2: float = 0.0
    trained_on: Mapping[str, int] | None = None  # queries per side, for the manifest

    def logit(self, query: str) -> float:
        tokens = query_tokens(query)
        total = self.bias + self.length_weight * math.log1p(len(tokens))
        get = self.weights.get
        for token in set(tokens):
            total += get(token, 0.0)
        return total

    def probability(self, query: str) -> float:
        return _sigmoid(self.logit(query))

    def probabilities(self, queries: Iterable[str]) -> NDArray[np.float64]:
        """One probability per query; repeated queries are scored once."""
        cache: dict[str, float] = {}
        out = []
        for query in queries:
            value = cache.get(query)
            if value is None:
                value = cache[query] = self.probability(query)
            out.append(value)
        return np.asarray(out, np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "bias": self.bias,
            "length_weight": self.length_weight,
            "l2": self.l2,
            "trained_on": dict(self.trained_on or {}),
            "weights": dict(sorted(self.weights.items())),
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, source: str = "query shift detector"
    ) -> QueryShiftDetector:
        if data.get("format") != FORMAT:
            raise BundleError(
                f"{source}: format {data.get('format')!r}, expected {FORMAT!r}; re-export the bundle"
            )
        try:
            weights = {str(k): float(v) for k, v in dict(data["weights"]).items()}
            values = [float(data["bias"]), float(data["length_weight"]), *weights.values()]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{source}: malformed ({exc}); re-export the bundle") from exc
        if not all(math.isfinite(v) for v in values):
            raise BundleError(f"{source}: holds a non-finite weight; re-export the bundle")
        return cls(
            weights=weights,
            length_weight=float(data["length_weight"]),
            bias=float(data["bias"]),
            l2=float(data.get("l2", 0.0)),
            trained_on=dict(data.get("trained_on") or {}),
        )


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def fit_query_shift(
    in_distribution: Sequence[str],
    shifted_pool: Sequence[str],
    *,
    l2: float = 0.1,
    max_vocabulary: int = 2048,
    min_count: int = 2,
    max_iter: int = 100,
) -> QueryShiftDetector:
    """Fit the domain classifier: training queries (label 0) against pool queries (label 1).

    L2-regularised logistic regression with balanced class weights, solved by Newton's method (the
    problem is small: one row per distinct query, at most ``max_vocabulary`` token features, kept by
    frequency among tokens seen at least ``min_count`` times). Choose ``l2`` on dev queries.
    """
    id_queries, pool_queries = sorted(set(in_distribution)), sorted(set(shifted_pool))
    if not id_queries or not pool_queries:
        raise InputError(
            f"fit_query_shift needs queries on both sides, got {len(id_queries)} in-distribution and "
            f"{len(pool_queries)} pool queries; give it an unlabeled pool of the shifted traffic"
        )
    if not l2 > 0:
        raise InputError(f"l2 must be > 0, got {l2}")
    counts = Counter(t for q in (*id_queries, *pool_queries) for t in set(query_tokens(q)))
    vocabulary = [t for t, c in counts.most_common() if c >= min_count][:max_vocabulary]
    index = {t: i for i, t in enumerate(vocabulary)}
    queries = [*id_queries, *pool_queries]
    x = _features(queries, index)
    y = np.r_[np.zeros(len(id_queries)), np.ones(len(pool_queries))]
    w = _newton_logreg(x, y, l2, max_iter)
    return QueryShiftDetector(
        weights={t: float(w[i]) for t, i in index.items() if w[i] != 0.0},
        length_weight=float(w[-2]),
        bias=float(w[-1]),
        l2=l2,
        trained_on={"in_distribution_queries": len(id_queries), "pool_queries": len(pool_queries)},
    )


def _features(queries: Sequence[str], index: Mapping[str, int]) -> NDArray[np.float64]:
    x = np.zeros((len(queries), len(index) + 2))
    for row, query in enumerate(queries):
        tokens = query_tokens(query)
        for token in set(tokens):
            col = index.get(token)
            if col is not None:
                x[row, col] = 1.0
        x[row, -2] = math.log1p(len(tokens))
        x[row, -1] = 1.0  # bias column (not penalised)
    return x


def _newton_logreg(
    x: NDArray[np.float64], y: NDArray[np.float64], l2: float, max_iter: int
) -> NDArray[np.float64]:
    n, d = x.shape
    sample_weight = np.where(y == 1, n / (2 * y.sum()), n / (2 * (n - y.sum())))
    penalty = np.full(d, l2)
    penalty[-1] = 0.0
    w = np.zeros(d)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (sample_weight * (p - y)) / n + penalty * w
        hess = (x * (sample_weight * p * (1 - p))[:, None]).T @ x / n + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def query_means(values: NDArray[np.floating], queries: Sequence[str]) -> dict[str, float]:
    """The mean of per-pair ``values`` for each distinct query (a query-level density score)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for value, query in zip(np.asarray(values, np.float64).tolist(), queries, strict=True):
        sums[query] = sums.get(query, 0.0) + value
        counts[query] = counts.get(query, 0) + 1
    return {q: sums[q] / counts[q] for q in sums}


__all__ = ["FORMAT", "QueryShiftDetector", "fit_query_shift", "query_means", "query_tokens"]
