"""Out-of-distribution scoring on the student's pooled representation, in numpy.

The detector is class-conditional Mahalanobis with a shared covariance (Lee et al., 2018):

    score(x) = min_c (x - mu_c)^T  Sigma^{-1}  (x - mu_c)

fitted on in-distribution training representations. The graph outputs the representation beside
the logits, so the score costs one small matrix product, not a second forward pass. The threshold
is the score quantile that keeps a target share of in-distribution pairs (default 95%) below it.
Statistics are stored as plain arrays in an ``.npz`` (never pickle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import BundleError, InputError

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class MahalanobisDetector:
    """Class means ``(C, D)`` and shared precision ``(D, D)`` of in-distribution representations."""

    means: FloatArray
    precision: FloatArray
    _center32: NDArray[np.float32] = field(init=False, repr=False, compare=False)
    _whiten32: NDArray[np.float32] = field(init=False, repr=False, compare=False)
    _means_z32: NDArray[np.float32] = field(init=False, repr=False, compare=False)

    @classmethod
    def fit(
        cls, features: NDArray[np.floating], labels: NDArray[np.integer], *, shrinkage: float = 1e-3
    ) -> MahalanobisDetector:
        """Fit from representations ``(N, D)`` and integer class labels ``(N,)``.

        ``shrinkage`` adds ``shrinkage * mean(diag(Sigma))`` to the diagonal so the precision exists
        even when D is close to N or features are collinear.
        """
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise InputError(f"features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
        classes = np.unique(y)
        if len(classes) == 0:
            raise InputError("cannot fit an OOD detector on zero samples")
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / max(len(x) - len(classes), 1)
        cov += np.eye(cov.shape[0]) * shrinkage * float(np.mean(np.diag(cov)) or 1.0)
        return cls(means=means, precision=np.linalg.inv(cov))

    def __post_init__(self) -> None:
        # Whitening, once per load: with P = L L^T, (x-m)^T P (x-m) = |(x-c) L - (m-c) L|^2, where c
        # is the mean of the class means. Centring first keeps float32 differences small.
        center = self.means.mean(axis=0)
        try:
            whiten = np.linalg.cholesky(self.precision)
        except np.linalg.LinAlgError:  # not positive definite (e.g. edited by hand): clip, then factor
            values, vectors = np.linalg.eigh((self.precision + self.precision.T) / 2)
            whiten = vectors * np.sqrt(np.clip(values, 0.0, None))
        object.__setattr__(self, "_center32", center.astype(np.float32))
        object.__setattr__(self, "_whiten32", np.ascontiguousarray(whiten, dtype=np.float32))
        object.__setattr__(self, "_means_z32", ((self.means - center) @ whiten).astype(np.float32))

    def float32_whitening(self) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """``(c, L, (M - c) L)`` in float32: the centre, the whitening and the whitened class means
        :meth:`score` uses (the export writes the same maths into the graph)."""
        return self._center32.copy(), self._whiten32.copy(), self._means_z32.copy()

    def score(self, features: NDArray[np.floating]) -> FloatArray:
        """Squared Mahalanobis distance to the nearest class mean, one per row (higher = more OOD).

        Float32 ``einsum(optimize=False)``, which never calls BLAS: a BLAS thread pool beside
        onnxruntime's busy-waits on the same cores and doubled the cost of a whole scoring call
        (measured in bench/). One ``(N, D) x (D, D)`` product, then ``N x C`` small differences.
        """
        x = np.asarray(features, dtype=np.float32) - self._center32
        z = np.einsum("nd,dk->nk", x, self._whiten32, optimize=False)
        diff = z[:, None, :] - self._means_z32[None, :, :]
        distances = np.einsum("ncd,ncd->nc", diff, diff, optimize=False)
        return distances.min(axis=1).astype(np.float64)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, means=self.means, precision=self.precision)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MahalanobisDetector:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                means, precision = data["means"], data["precision"]
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(
                f"OOD statistics {path} are unreadable (need arrays means, precision): {exc}"
            ) from exc
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise BundleError(
                f"OOD statistics {path} have inconsistent shapes: means {means.shape}, "
                f"precision {precision.shape}"
            )
        return cls(means=means.astype(np.float64), precision=precision.astype(np.float64))


def threshold_for_coverage(id_scores: NDArray[np.floating], coverage: float = 0.95) -> float:
    """The score below which ``coverage`` of in-distribution samples fall."""
    if not 0.0 < coverage < 1.0:
        raise InputError(f"coverage must lie in (0, 1), got {coverage}")
    scores = np.asarray(id_scores, dtype=np.float64)
    if scores.size == 0:
        raise InputError("cannot set an OOD threshold from zero in-distribution scores")
    return float(np.quantile(scores, coverage))
