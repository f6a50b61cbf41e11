"""DASA: distribution-aware sample augmentation — pick the pool pairs the training set covers worst.

Numpy only (no torch): features come in as arrays, e.g. from
:func:`darl_lite.distill.stages.extract_features` (the classification head's input).

1. **Score** every pool sample with two OOD detectors fitted on the training features:

   * class-conditional Mahalanobis distance with a shared covariance (Lee et al., 2018), reusing
     :class:`darl_lite.ood.MahalanobisDetector` — sees where the pool leaves the class clusters;
   * k-nearest-neighbour distance (Sun et al., 2022, "Out-of-distribution detection with deep
     nearest neighbors"): ``1 − cos`` to the k-th nearest training sample on L2-normalised
     features — non-parametric, sees holes a Gaussian per class smooths over. Computed in chunks
     so memory stays bounded (``O(chunk · N_train)``).

2. **Combine** them by rank: each detector's scores become average ranks scaled to ``[0, 1]``, and the
   combined score is their mean (a Borda count). Ranks make a squared Mahalanobis distance (roughly
   χ² in D dimensions, heavy-tailed) and a cosine distance (in ``[0, 2]``) commensurable without a
   scale to tune, and one detector's outliers cannot drown the other.

3. **Select with a cap and diversity**: among the ``candidate_factor · budget`` best-scored samples,
   greedily take the one with the largest gain ``combined · min(1, d / r)``, where ``d`` is its
   cosine distance to the nearest sample already chosen and ``r`` the training set's own spacing
   (median k-NN distance between training samples, :func:`training_spacing`). Samples as spread out
   as training data keep their full score, so the poorly covered go first; a near-duplicate of a
   chosen sample loses its gain, so a tight OOD cluster gives a few representatives and the budget
   reaches the next region (soft non-maximum suppression at the data's own scale, rather than pure
   farthest-point selection, which would treat one chosen sample as covering a whole region and
   then prefer in-distribution outliers). ``per_query_cap`` bounds the samples from one query (one
   query cannot take the budget); when the caps leave no candidate open, the next-best samples
   join the candidates.

:func:`random_selection` draws the same number under the same caps: the ablation's control.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError
from darl_lite.metrics import average_ranks
from darl_lite.ood import MahalanobisDetector
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: A labeler grades the selected pool pairs: ``pairs -> probabilities (N, C)`` (rows sum to 1).
Labeler = Callable[[Sequence[Pair]], NDArray[np.floating]]
#: Largest similarity block :func:`knn_distance` holds at once, in matrix entries (float32: 64 MB).
DEFAULT_MAX_BLOCK = 16_000_000
DETECTORS: tuple[str, ...] = ("mahalanobis", "knn")


@dataclass(frozen=True)
class SelectionResult:
    """Which pool samples were chosen, in selection order, as plain Python values.

    ``scores`` is the combined (rank-averaged) score of each chosen sample, ``detector_scores`` each
    detector's raw score for them (same order); both are empty for :func:`random_selection`.
    """

    indices: tuple[int, ...]
    scores: tuple[float, ...]
    detector_scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    method: str = "dasa"

    def __len__(self) -> int:
        return len(self.indices)


def _features(values: NDArray[np.floating], name: str) -> NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (N, D); got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} must be finite; found NaN or inf")
    return x


def l2_normalise(features: NDArray[np.floating]) -> NDArray[np.float32]:
    """Rows scaled to unit L2 norm (a zero row stays zero), as float32."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def knn_distance(
    train_features: NDArray[np.floating],
    query_features: NDArray[np.floating],
    k: int = 10,
    *,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> NDArray[np.float64]:
    """``1 − cos(x, t_(k))``: cosine distance from each query row to its k-th nearest training row.

    Both sides are L2-normalised; queries are processed in chunks of ``max_block // N_train`` rows
    so the similarity block never exceeds ``max_block`` entries. ``k`` larger than the training set
    is refused. Higher = farther from the training data.
    """
    train = l2_normalise(_features(train_features, "train_features"))
    query = l2_normalise(_features(query_features, "query_features"))
    if train.shape[1] != query.shape[1]:
        raise InputError(
            f"train and query features must have the same width; got {train.shape[1]} and {query.shape[1]}"
        )
    if not 1 <= k <= len(train):
        raise InputError(f"k must lie in [1, {len(train)}] (the training set size); got {k}")
    if max_block < len(train):
        raise InputError(f"max_block must be >= the training set size {len(train)}; got {max_block}")
    out = np.empty(len(query), dtype=np.float64)
    chunk = max(1, max_block // len(train))
    for start in range(0, len(query), chunk):
        sims = query[start : start + chunk] @ train.T
        # The k-th largest similarity of each row = the (N − k)-th smallest.
        kth = np.partition(sims, len(train) - k, axis=1)[:, len(train) - k]
        out[start : start + chunk] = 1.0 - kth.astype(np.float64)
    return out


def rank_normalise(scores: NDArray[np.floating]) -> NDArray[np.float64]:
    """Average ranks scaled to ``[0, 1]`` (lowest score 0, highest 1, ties share); 0.5 for one sample."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return values
    if values.size == 1:
        return np.array([0.5])
    return (average_ranks(values) - 1.0) / (values.size - 1.0)


def detector_scores(
    train_features: NDArray[np.floating],
    train_labels: NDArray[np.integer],
    pool_features: NDArray[np.floating],
    *,
    k: int = 10,
    shrinkage: float = 1e-3,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> dict[str, NDArray[np.float64]]:
    """Raw scores of every pool row: ``{"mahalanobis", "knn", "combined"}`` (higher = less covered).

    ``combined`` is the mean of the two detectors' :func:`rank_normalise` d scores.
    """
    train = _features(train_features, "train_features")
    pool = _features(pool_features, "pool_features")
    labels = np.asarray(train_labels)
    if labels.shape != (len(train),):
        raise InputError(f"train_labels must have shape ({len(train)},); got {labels.shape}")
    if train.shape[1] != pool.shape[1]:
        raise InputError(
            f"train and pool features must have the same width; got {train.shape[1]} and {pool.shape[1]}"
        )
    maha = MahalanobisDetector.fit(train, labels, shrinkage=shrinkage).score(pool)
    knn = knn_distance(train, pool, k, max_block=max_block)
    combined = (rank_normalise(maha) + rank_normalise(knn)) / 2.0
    return {"mahalanobis": maha, "knn": knn, "combined": combined}


def _check_budget(budget: int, pool_size: int, per_query_cap: int | None) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise InputError(f"budget must be an integer >= 0; got {budget!r}")
    if budget > pool_size:
        raise InputError(f"budget {budget} exceeds the pool size {pool_size}")
    if per_query_cap is not None and per_query_cap < 1:
        raise InputError(f"per_query_cap must be None or >= 1; got {per_query_cap}")


def _query_keys(pool_query_ids: Sequence[Hashable] | None, pool_size: int) -> list[Hashable]:
    if pool_query_ids is None:
        return list(range(pool_size))  # every sample its own query: no cap binds
    keys = list(pool_query_ids)
    if len(keys) != pool_size:
        raise InputError(f"pool_query_ids must have one id per pool row ({pool_size}); got {len(keys)}")
    return keys


def training_spacing(
    train_features: NDArray[np.floating],
    k: int = 10,
    *,
    max_rows: int = 1000,
    seed: int = 0,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> float:
    """Median k-NN cosine distance of training rows to the rest of the training set.

    The scale at which training samples sit apart; estimated on at most ``max_rows`` seeded rows
    (each row's own match, distance 0, is skipped by asking for the ``k+1``-th neighbour).
    """
    train = _features(train_features, "train_features")
    if len(train) < 2:
        return 0.0
    k = min(k, len(train) - 1)
    rows = np.random.default_rng(seed).permutation(len(train))[:max_rows]
    return float(np.median(knn_distance(train, train[rows], k + 1, max_block=max_block)))


def _diverse_greedy(
    features: NDArray[np.float32],
    combined: NDArray[np.float64],
    order: NDArray[np.int64],
    codes: NDArray[np.int64],
    budget: int,
    per_query_cap: int | None,
    candidate_factor: int,
    radius: float,
) -> list[int]:
    """Greedy selection by ``gain = combined · min(1, d / radius)`` among the best-scored candidates.

    ``d`` is a candidate's cosine distance to the nearest sample chosen so far (∞ before the first),
    so a candidate nearer to a chosen one than the training set's own spacing ``radius`` loses gain
    in proportion, and a near-duplicate loses it all. ``order`` ranks the pool by ``combined`` (best
    first); the first ``candidate_factor · budget`` are candidates, widened when the per-query caps
    (``codes``: an integer query code per pool row) leave none open.
    """
    cap = np.iinfo(np.int64).max if per_query_cap is None else per_query_cap
    taken = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.int64)
    chosen: list[int] = []
    n_candidates = min(len(order), budget * candidate_factor)
    candidates = order[:n_candidates]
    nearest = np.full(len(candidates), np.inf)
    alive = np.ones(len(candidates), dtype=bool)
    while len(chosen) < budget:
        alive &= taken[codes[candidates]] < cap
        if not alive.any():
            if n_candidates >= len(order):
                break  # the caps leave nothing more to take
            extra = order[n_candidates : n_candidates + budget * candidate_factor]
            n_candidates += len(extra)
            new_nearest = np.full(len(extra), np.inf)
            if chosen:
                sims = features[extra] @ features[chosen].T
                new_nearest = 1.0 - sims.max(axis=1).astype(np.float64)
            candidates = np.concatenate([candidates, extra])
            nearest = np.concatenate([nearest, new_nearest])
            alive = np.concatenate([alive, np.ones(len(extra), dtype=bool)])
            continue
        live = np.flatnonzero(alive)
        factor = np.ones(len(live)) if radius <= 0 else np.minimum(1.0, nearest[live] / radius)
        # argmax takes the first of equal gains, i.e. the better-scored candidate.
        j = int(live[np.argmax(combined[candidates[live]] * factor)])
        i = int(candidates[j])
        chosen.append(i)
        taken[codes[i]] += 1
        alive[j] = False
        dist = 1.0 - (features[candidates] @ features[i]).astype(np.float64)
        np.minimum(nearest, dist, out=nearest)
    return chosen


def _query_codes(keys: Sequence[Hashable]) -> NDArray[np.int64]:
    index: dict[Hashable, int] = {}
    return np.asarray([index.setdefault(key, len(index)) for key in keys], dtype=np.int64)


def select_augmentation(
    train_features: NDArray[np.floating],
    train_labels: NDArray[np.integer],
    pool_features: NDArray[np.floating],
    pool_query_ids: Sequence[Hashable] | None,
    budget: int,
    *,
    k: int = 10,
    per_query_cap: int | None = None,
    candidate_factor: int = 4,
    min_distance: float | None = None,
    seed: int = 0,
    shrinkage: float = 1e-3,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> SelectionResult:
    """Choose ``budget`` pool rows the training set covers worst, diverse and capped per query.

    Scores: :func:`detector_scores`; selection: the diversity-aware greedy rule of the module
    docstring among the ``candidate_factor · budget`` best-scored rows, with ``min_distance`` as the
    radius (``None``: :func:`training_spacing`), at most ``per_query_cap`` per query id (``None``:
    no cap). Fewer than ``budget`` rows come back only when the caps allow no more (logged). Exact
    score ties are broken by a permutation drawn from ``seed``, so the result is deterministic.
    """
    pool = _features(pool_features, "pool_features")
    _check_budget(budget, len(pool), per_query_cap)
    if candidate_factor < 1:
        raise InputError(f"candidate_factor must be >= 1; got {candidate_factor}")
    if min_distance is not None and not min_distance >= 0:
        raise InputError(f"min_distance must be None or >= 0; got {min_distance}")
    keys = _query_keys(pool_query_ids, len(pool))
    if budget == 0:
        return SelectionResult((), (), {name: () for name in DETECTORS})
    scores = detector_scores(
        train_features, train_labels, pool, k=k, shrinkage=shrinkage, max_block=max_block
    )
    tiebreak = np.random.default_rng(seed).permutation(len(pool))
    order = np.lexsort((tiebreak, -scores["combined"])).astype(np.int64)
    radius = (
        training_spacing(train_features, k, seed=seed, max_block=max_block)
        if min_distance is None
        else float(min_distance)
    )
    chosen = _diverse_greedy(
        l2_normalise(pool),
        scores["combined"],
        order,
        _query_codes(keys),
        budget,
        per_query_cap,
        candidate_factor,
        radius,
    )
    if len(chosen) < budget:
        logger.warning(
            "DASA chose %d of %d: per_query_cap=%s leaves no more pool rows",
            len(chosen),
            budget,
            per_query_cap,
        )
    idx = np.asarray(chosen, dtype=np.int64)
    return SelectionResult(
        indices=tuple(chosen),
        scores=tuple(float(v) for v in scores["combined"][idx]),
        detector_scores={name: tuple(float(v) for v in scores[name][idx]) for name in DETECTORS},
        method="dasa",
    )


def random_selection(
    pool_size: int,
    budget: int,
    *,
    pool_query_ids: Sequence[Hashable] | None = None,
    per_query_cap: int | None = None,
    seed: int = 0,
) -> SelectionResult:
    """``budget`` pool rows drawn uniformly at random (seeded) under the same per-query cap as DASA."""
    _check_budget(budget, pool_size, per_query_cap)
    keys = _query_keys(pool_query_ids, pool_size)
    taken: Counter[Hashable] = Counter()
    chosen: list[int] = []
    for i in np.random.default_rng(seed).permutation(pool_size).tolist():
        if len(chosen) == budget:
            break
        if per_query_cap is not None and taken[keys[i]] >= per_query_cap:
            continue
        chosen.append(int(i))
        taken[keys[i]] += 1
    return SelectionResult(indices=tuple(chosen), scores=(), detector_scores={}, method="random")


def human_labeler(pairs: Sequence[Pair], n_grades: int = 3) -> NDArray[np.float32]:
    """One-hot probabilities from the pairs' own human grades (the shipped pool's hidden grades).

    Raises :class:`InputError` naming the first pair without a grade.
    """
    out = np.zeros((len(pairs), n_grades), dtype=np.float32)
    for i, pair in enumerate(pairs):
        if pair.grade is None or not 0 <= pair.grade < n_grades:
            raise InputError(
                f"human_labeler needs a grade in [0, {n_grades}) on every pair; "
                f"pairs[{i}] has {pair.grade!r}. "
                "Use a teacher labeler for an unlabeled pool."
            )
        out[i, pair.grade] = 1.0
    return out


def label_selection(
    pool: Sequence[Pair], selection: SelectionResult, labeler: Labeler
) -> tuple[list[Pair], NDArray[np.float32]]:
    """The chosen pool pairs and their labels from ``labeler``, checked to be ``(n, C)`` distributions."""
    chosen = [pool[i] for i in selection.indices]
    if not chosen:
        return [], np.zeros((0, 0), dtype=np.float32)
    probs = np.asarray(labeler(chosen), dtype=np.float32)
    if probs.ndim != 2 or probs.shape[0] != len(chosen):
        raise InputError(f"the labeler must return ({len(chosen)}, C) probabilities; got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or np.any(np.abs(probs.sum(axis=1) - 1) > 1e-3):
        raise InputError("the labeler must return finite, non-negative rows that sum to 1")
    return chosen, probs
