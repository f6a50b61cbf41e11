"""DASA pool scoring on a Ray actor pool: the LLM features of a large unlabeled pool and their OOD scores.

    scores = pool_scores_ray(FeatureSpec(model_dir, layer=18), x_train, y_train, pool,
                             standardise=(mean, scale), options=RayOptions(actors=8))
    scores["combined"]  # == dasa.detector_scores(x_train, y_train, pool_x)["combined"]

The expensive part of DASA on an LLM teacher is the pool's features: one LLM forward pass per pool
pair (the probe's input, the last-token state at the head's layer, as
:func:`darl_lite.distill.llm_features.compute_states` computes it). Each actor loads the LLM once,
holds the training features and the fitted Mahalanobis detector, and returns for its rows the two
raw detector scores (:mod:`darl_lite.distill.dasa`: squared Mahalanobis distance, k-NN cosine
distance), and the features themselves if asked (DASA's diversity step needs the candidates'). The
driver puts rows back in pool order and combines the detectors by rank over the *whole* pool, as
:func:`darl_lite.distill.dasa.detector_scores` does, so the scores equal the single-process ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from darl_lite.distill.dasa import knn_distance, rank_normalise
from darl_lite.distill.llm_features import TEACHER_TEMPLATE
from darl_lite.distill.ray_engine import (
    RayOptions,
    import_ray,
    ray_session,
    run_actor_pool,
    set_actor_threads,
)
from darl_lite.errors import DataError, InputError
from darl_lite.ood import MahalanobisDetector
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

Standardiser = tuple[NDArray[np.float32], NDArray[np.float32]]


@dataclass(frozen=True)
class FeatureSpec:
    """The pool features DASA scores: the LLM's last-token state at ``layer`` for the teacher's prompt."""

    model: str
    layer: int
    template: str = TEACHER_TEMPLATE
    max_length: int = 96
    batch_size: int = 32


class PoolScoreActor:
    """One Ray actor: the LLM (loaded once) and the fitted detectors; scores numpy batches of pool rows."""

    def __init__(
        self,
        spec: FeatureSpec,
        train: NDArray[np.float64],
        detector: tuple[NDArray[np.float64], NDArray[np.float64]],
        standardise: Standardiser | None,
        k: int,
        return_features: bool,
        threads: int,
    ) -> None:
        from darl_lite.distill.backbone import pad_token_id_of
        from darl_lite.distill.teacher_tune import load_llm

        set_actor_threads(threads)
        self.spec, self.train, self.k = spec, train, k
        self.detector = MahalanobisDetector(means=detector[0], precision=detector[1])
        self.standardise, self.return_features = standardise, return_features
        self.model, self.tokenizer = load_llm(spec.model)
        n_states = int(self.model.config.num_hidden_layers) + 1
        if not -n_states <= spec.layer < n_states:
            raise InputError(f"FeatureSpec.layer {spec.layer}: this model has {n_states} hidden states")
        self.layer = spec.layer % n_states
        self.pad_id = pad_token_id_of(self.model, self.tokenizer)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from darl_lite.distill.llm_features import compute_states

        pairs = [Pair(query=str(q), item=str(i)) for q, i in zip(batch["query"], batch["item"], strict=True)]
        spec = self.spec
        with tqdm(total=len(pairs), disable=True) as bar:
            states = compute_states(
                self.model, self.tokenizer, pairs, (self.layer,), spec.template,
                spec.max_length, spec.batch_size, self.pad_id, bar,
            )[self.layer]  # fmt: skip
        x = states if self.standardise is None else (states - self.standardise[0]) / self.standardise[1]
        out = {
            "row": np.asarray(batch["row"]),
            "mahalanobis": self.detector.score(np.asarray(x, dtype=np.float64)),
            "knn": knn_distance(self.train, x, self.k),
        }
        if self.return_features:
            out["features"] = np.asarray(x, dtype=np.float32)
        return out


def _checked_train(
    train_features: NDArray[np.floating], train_labels: NDArray[np.integer], k: int
) -> tuple[NDArray[np.float64], NDArray[np.integer]]:
    train = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_labels)
    if train.ndim != 2 or not np.all(np.isfinite(train)):
        raise InputError(f"train_features must be a finite 2-D array (N, D); got shape {train.shape}")
    if labels.shape != (len(train),):
        raise InputError(f"train_labels must have shape ({len(train)},); got {labels.shape}")
    if not 1 <= k <= len(train):
        raise InputError(f"k must lie in [1, {len(train)}] (the training set size); got {k}")
    return train, labels


def pool_scores_ray(
    spec: FeatureSpec,
    train_features: NDArray[np.floating],
    train_labels: NDArray[np.integer],
    pool: Sequence[Pair],
    *,
    standardise: Standardiser | None = None,
    k: int = 10,
    shrinkage: float = 1e-3,
    return_features: bool = False,
    options: RayOptions | None = None,
) -> dict[str, NDArray[np.floating]]:
    """``{"mahalanobis", "knn", "combined"}`` (and ``"features"``) of every pool pair, in pool order.

    ``train_features`` are the training pairs' features at ``spec.layer``, already standardised
    when ``standardise = (mean, scale)`` is given (the pool's are standardised the same way in the
    actors, as :mod:`darl_lite.distill.llm_teacher` does before DASA). The scores equal
    :func:`darl_lite.distill.dasa.detector_scores` on the pool features computed in one process.
    """
    options = options or RayOptions()
    import_ray()
    train, labels = _checked_train(train_features, train_labels, k)
    for i, pair in enumerate(pool):
        if not isinstance(pair, Pair):
            raise InputError(f"pool[{i}] must be a Pair, got {type(pair).__name__}")
    if not pool:
        raise InputError("the pool is empty; pass at least one pair to score")
    if standardise is not None:
        standardise = (np.asarray(standardise[0], np.float32), np.asarray(standardise[1], np.float32))
        if standardise[0].shape != (train.shape[1],) or standardise[1].shape != (train.shape[1],):
            raise InputError(f"standardise must be (mean, scale), each of shape ({train.shape[1]},)")
    fitted = MahalanobisDetector.fit(train, labels, shrinkage=shrinkage)
    ctor = (spec, train, (fitted.means, fitted.precision), standardise, k, return_features, options.threads)
    n = len(pool)
    maha, knn = np.full(n, np.nan), np.full(n, np.nan)
    features: NDArray[np.float32] | None = None
    with ray_session(options.address), tqdm(total=n, desc="DASA pool on Ray", unit="pair") as bar:
        rows = ({"row": i, "query": p.query, "item": p.item} for i, p in enumerate(pool))
        for batch in run_actor_pool(rows, PoolScoreActor, ctor, options):
            idx = np.asarray(batch["row"], dtype=np.int64)
            maha[idx], knn[idx] = batch["mahalanobis"], batch["knn"]
            if return_features:
                if features is None:
                    features = np.empty((n, np.asarray(batch["features"]).shape[1]), np.float32)
                features[idx] = batch["features"]
            bar.update(len(idx))
    if np.isnan(maha).any() or np.isnan(knn).any():
        raise DataError(f"{int(np.isnan(maha).sum())} pool rows came back from Ray without scores")
    out: dict[str, NDArray[np.floating]] = {
        "mahalanobis": maha,
        "knn": knn,
        "combined": (rank_normalise(maha) + rank_normalise(knn)) / 2.0,
    }
    if features is not None:
        out["features"] = features
    return out


__all__ = ["FeatureSpec", "PoolScoreActor", "pool_scores_ray"]
