"""The DaRL graded loss: cross-entropy + an ordinal term + an over-confidence term, as tensor functions.

Notation, for a batch of ``N`` pairs and ``C`` ordered grades ``0 < 1 < … < C−1``: ``z`` logits
``(N, C)``, ``q = softmax(z)``, ``F_q(k) = Σ_{j≤k} q_j`` its cumulative distribution, ``y`` human
grades ``(N,)`` with ``ignore_index`` (``-1``) where a pair has none, ``p`` target probabilities
``(N, C)`` (a teacher's, or one-hot human grades).

Why these terms
---------------
* **Ordinal term — earth mover's distance (EMD) between grade distributions** (default,
  ``ordinal="emd"``): ``Σ_{k<C−1} |F_q(k) − F_p(k)|``. Against a hard grade it *is* the expected
  grade distance ``Σ_k q_k |k − y|`` (so calling a strong pair irrelevant costs twice what calling it
  weak costs, linear like the 0/1/2 NDCG gains), and against soft teacher targets it is the
  1-Wasserstein distance, zero only when ``q = p``: one term serves human grades and distillation
  alike. It needs no extra head (CORAL needs ``C−1`` tied binary outputs, which would change the
  model's outputs and the exported graph). ``ordinal="emd2"`` squares the CDF gaps (Hou et al.,
  2017); ``ordinal="cumulative"`` is a CORAL-style binary cross-entropy over the ``C−1`` questions
  "grade > k", read off the softmax's own CDF.
* **Over-confidence term — margin-based logit penalty** (default, ``kind="margin"``, Liu et al.,
  2022, "The Devil is in the Margins", MbLS): penalise only logit gaps larger than a margin. The
  confidence penalty (``kind="confidence"``, −β·H(q), Pereyra et al., 2017) and label smoothing both
  pull *every* gap towards 0, which also flattens the confident, correct predictions a ranker needs;
  the margin leaves a gap up to ``m`` free (``m = 3`` caps a 3-grade softmax near 0.9 when both other
  logits sit at the margin). The ablation decides between them; both are here.

Every function returns a scalar averaged over the pairs that take part (rows whose grade is
``ignore_index`` are skipped by the hard-label terms). Hand-computed values are in
``tests/test_recipe_losses.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from darl_lite.distill.losses import tempered_teacher_probs
from darl_lite.errors import InputError

OrdinalKind = Literal["emd", "emd2", "cumulative"]
ConfidenceKind = Literal["margin", "confidence", "none"]

ORDINAL_KINDS: tuple[str, ...] = ("emd", "emd2", "cumulative")
CONFIDENCE_KINDS: tuple[str, ...] = ("margin", "confidence", "none")
#: Default logit margin of :func:`margin_penalty` (3 grades: max probability ≈ 0.91 at the margin).
DEFAULT_MARGIN = 3.0
#: Smallest probability fed to a log in :func:`cumulative_bce` (keeps it finite at saturation).
_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InputError(f"logits must have shape (N, C) with C >= 2; got {tuple(logits.shape)}")


def _check_probs(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    _check_logits(logits)
    if target_probs.shape != logits.shape:
        raise InputError(
            f"target_probs must have the shape of logits {tuple(logits.shape)}; "
            f"got {tuple(target_probs.shape)}"
        )
    return target_probs.detach().to(logits.dtype)


def _graded_rows(logits: torch.Tensor, grades: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Boolean mask of the rows with a grade; refuses a wrong shape or a grade outside ``[0, C)``."""
    _check_logits(logits)
    if grades.ndim != 1 or grades.shape[0] != logits.shape[0]:
        raise InputError(
            f"grades must have shape ({logits.shape[0]},) to match logits; got {tuple(grades.shape)}"
        )
    grades = grades.long()
    graded = grades != ignore_index
    n = logits.shape[1]
    bad = graded & ((grades < 0) | (grades >= n))
    if bool(bad.any()):
        raise InputError(
            f"grades must lie in [0, {n}) or equal ignore_index={ignore_index}; "
            f"got {sorted(set(grades[bad].tolist()))}"
        )
    return graded


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A 0 still attached to the graph, so ``backward`` works on a batch with nothing to learn."""
    return logits.sum() * 0.0


def _one_hot(grades: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(grades.long(), n).to(dtype)


# --------------------------------------------------------------------------------------------------
# Cross-entropy


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target distributions: ``L = −(1/N) Σ_i Σ_k p_ik log q_ik``.

    With one-hot ``p`` this is the usual cross-entropy; with teacher probabilities it differs from
    ``KL(p‖q)`` by the constant ``H(p)`` only (same gradient, ``(q − p)/N``). Targets carry no gradient.
    """
    target = _check_probs(logits, target_probs)
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def graded_cross_entropy(logits: torch.Tensor, grades: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy over the grades: ``L = −(1/|G|) Σ_{i∈G} log q_{i,y_i}``, 0 when ``G`` is empty.

    ``G`` are the rows whose grade is not ``ignore_index``.
    """
    graded = _graded_rows(logits, grades, ignore_index)
    if not bool(graded.any()):
        return _zero(logits)
    return F.cross_entropy(logits[graded], grades.long()[graded])


# --------------------------------------------------------------------------------------------------
# Ordinal terms


def emd_loss(logits: torch.Tensor, target_probs: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Earth mover's distance between ordered grade distributions (Hou et al., 2017, "Squared EMD").

    ``L = (1/N) Σ_i Σ_{k=0}^{C−2} |F_q(k) − F_p(k)|^power``. With ``power = 1`` it is the
    1-Wasserstein distance on the grade line; for a one-hot ``p`` at grade ``y`` it equals the
    expected grade distance ``Σ_k q_k |k − y|`` (see :func:`expected_grade_distance`). The last CDF
    entry is 1 on both sides and is left out. Targets carry no gradient.
    """
    if power not in (1, 2):
        raise InputError(f"power must be 1 or 2; got {power}")
    target = _check_probs(logits, target_probs)
    cdf_q = torch.softmax(logits, dim=-1).cumsum(dim=-1)[:, :-1]
    cdf_p = target.cumsum(dim=-1)[:, :-1]
    gap = (cdf_q - cdf_p).abs()
    return gap.pow(power).sum(dim=-1).mean()


def expected_grade_distance(
    logits: torch.Tensor, grades: torch.Tensor, power: int = 1, ignore_index: int = -1
) -> torch.Tensor:
    """Expected distance to the true grade: ``L = (1/|G|) Σ_{i∈G} Σ_k q_ik |k − y_i|^power``.

    The ordinal cost in its plainest form (``power = 2``: squared distance); with ``power = 1`` it
    equals :func:`emd_loss` against one-hot targets. 0 when no row is graded.
    """
    if power not in (1, 2):
        raise InputError(f"power must be 1 or 2; got {power}")
    graded = _graded_rows(logits, grades, ignore_index)
    if not bool(graded.any()):
        return _zero(logits)
    z = logits[graded]
    y = grades.long()[graded]
    ks = torch.arange(z.shape[1], device=z.device, dtype=z.dtype)
    distance = (ks[None, :] - y[:, None].to(z.dtype)).abs().pow(power)
    return (torch.softmax(z, dim=-1) * distance).sum(dim=-1).mean()


def cumulative_bce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """CORAL-style cumulative-link loss read off the softmax (Cao, Mirjalili & Raschka, 2020).

    For each threshold ``k < C−1`` the model's ``P(grade > k) = 1 − F_q(k)`` is scored with binary
    cross-entropy against the target's ``1 − F_p(k)`` (for a hard grade: ``1[y > k]``):
    ``L = (1/N) Σ_i Σ_{k<C−1} BCE(1 − F_q(k), 1 − F_p(k))``. Unlike CORAL it needs no extra head:
    the thresholds are consistent by construction because they come from one distribution.
    Probabilities are clamped to ``[1e-7, 1 − 1e-7]`` before the log.
    """
    target = _check_probs(logits, target_probs)
    above_q = (1.0 - torch.softmax(logits, dim=-1).cumsum(dim=-1)[:, :-1]).clamp(_EPS, 1.0 - _EPS)
    above_p = (1.0 - target.cumsum(dim=-1)[:, :-1]).clamp(0.0, 1.0)
    bce = -(above_p * above_q.log() + (1.0 - above_p) * (1.0 - above_q).log())
    return bce.sum(dim=-1).mean()


def ordinal_loss(logits: torch.Tensor, target_probs: torch.Tensor, kind: OrdinalKind = "emd") -> torch.Tensor:
    """Dispatch: ``"emd"`` → :func:`emd_loss` (power 1), ``"emd2"`` → power 2, ``"cumulative"`` →
    :func:`cumulative_bce`."""
    if kind == "emd":
        return emd_loss(logits, target_probs, power=1)
    if kind == "emd2":
        return emd_loss(logits, target_probs, power=2)
    if kind == "cumulative":
        return cumulative_bce(logits, target_probs)
    raise InputError(f"ordinal kind must be one of {', '.join(ORDINAL_KINDS)}; got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Over-confidence terms


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the prediction (Pereyra et al., 2017): ``L = −(1/N) Σ_i H(q_i)``,
    ``H(q) = −Σ_k q_k log q_k``.

    Adding ``β · L`` to a loss rewards spread-out predictions. Computed from ``log_softmax`` so a
    saturated softmax gives a finite value and gradient. Lowest value ``−log C`` (uniform ``q``).
    """
    _check_logits(logits)
    log_q = F.log_softmax(logits, dim=-1)
    return (log_q.exp() * log_q).sum(dim=-1).mean()


def margin_penalty(logits: torch.Tensor, margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    """Margin-based logit penalty of MbLS (Liu et al., 2022): ``L = (1/(N·C)) Σ_i Σ_k max(0, d_ik − m)``
    with ``d_ik = max_j z_ij − z_ik``.

    Only gaps wider than ``m`` cost anything, so confident predictions within the margin are left
    alone. The mean over ``N·C`` entries follows the authors' code, so their weight (λ = 0.1)
    carries over.
    """
    _check_logits(logits)
    if not margin >= 0:
        raise InputError(f"margin must be >= 0; got {margin}")
    gaps = logits.max(dim=-1, keepdim=True).values - logits
    return F.relu(gaps - margin).mean()


def overconfidence_loss(
    logits: torch.Tensor, kind: ConfidenceKind = "margin", margin: float = DEFAULT_MARGIN
) -> torch.Tensor:
    """Dispatch: ``"margin"`` → :func:`margin_penalty`, ``"confidence"`` → :func:`confidence_penalty`,
    ``"none"`` → 0."""
    if kind == "margin":
        return margin_penalty(logits, margin)
    if kind == "confidence":
        return confidence_penalty(logits)
    if kind == "none":
        _check_logits(logits)
        return _zero(logits)
    raise InputError(f"over-confidence kind must be one of {', '.join(CONFIDENCE_KINDS)}; got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Combined losses


def _check_weights(ordinal_weight: float, confidence_weight: float) -> None:
    if not ordinal_weight >= 0:
        raise InputError(f"ordinal_weight must be >= 0; got {ordinal_weight}")
    if not confidence_weight >= 0:
        raise InputError(f"confidence_weight must be >= 0; got {confidence_weight}")


def _plus_terms(
    loss: torch.Tensor,
    z: torch.Tensor,
    target: Callable[[], torch.Tensor],
    ordinal_weight: float,
    confidence_weight: float,
    ordinal: OrdinalKind,
    kind: ConfidenceKind,
    margin: float,
) -> torch.Tensor:
    """``loss + λ_o · ordinal(z, target()) + λ_c · overconfidence(z)``; a zero-weight term is not computed."""
    if ordinal_weight > 0:
        loss = loss + ordinal_weight * ordinal_loss(z, target(), ordinal)
    if confidence_weight > 0:
        loss = loss + confidence_weight * overconfidence_loss(z, kind, margin)
    return loss


def graded_loss(
    logits: torch.Tensor,
    grades: torch.Tensor,
    *,
    ordinal_weight: float = 0.5,
    confidence_weight: float = 0.1,
    kind: ConfidenceKind = "margin",
    ordinal: OrdinalKind = "emd",
    margin: float = DEFAULT_MARGIN,
    ignore_index: int = -1,
) -> torch.Tensor:
    """The graded loss with human grades:
    ``L = CE(z, y) + λ_o · ordinal(z, onehot(y)) + λ_c · overconfidence(z)``, over graded rows.

    ``ordinal`` picks :func:`ordinal_loss`'s kind (default EMD = expected grade distance), ``kind``
    the over-confidence term (:func:`overconfidence_loss`). Rows whose grade is ``ignore_index``
    take no part; with none graded the loss is 0 (attached to the graph). ``λ_o = λ_c = 0`` is plain
    cross-entropy.
    """
    _check_weights(ordinal_weight, confidence_weight)
    graded = _graded_rows(logits, grades, ignore_index)
    if not bool(graded.any()):
        return _zero(logits)
    z = logits[graded]
    y = grades.long()[graded]
    loss = F.cross_entropy(z, y)
    one_hot = lambda: _one_hot(y, z.shape[1], z.dtype)  # noqa: E731 - built only if the term is on
    return _plus_terms(loss, z, one_hot, ordinal_weight, confidence_weight, ordinal, kind, margin)


def soft_graded_loss(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    ordinal_weight: float = 0.5,
    confidence_weight: float = 0.1,
    kind: ConfidenceKind = "margin",
    ordinal: OrdinalKind = "emd",
    margin: float = DEFAULT_MARGIN,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The graded loss with target distributions (teacher probabilities), for distillation:
    ``L = T² · CE(p^T, softmax(z/T)) + λ_o · ordinal(z, p) + λ_c · overconfidence(z)``.

    ``p^T`` is the teacher tempered as in :func:`darl_lite.distill.losses.tempered_teacher_probs`;
    the ``T²`` keeps the cross-entropy's gradient scale independent of ``T`` (Hinton et al., 2015).
    The ordinal and over-confidence terms compare untempered distributions. At ``T = 1`` with
    one-hot targets this equals :func:`graded_loss`.
    """
    _check_weights(ordinal_weight, confidence_weight)
    target = _check_probs(logits, target_probs)
    if not temperature > 0:
        raise InputError(f"temperature must be > 0; got {temperature}")
    if temperature == 1.0:
        loss = soft_cross_entropy(logits, target)
    else:
        tempered = tempered_teacher_probs(target, temperature)
        loss = temperature**2 * soft_cross_entropy(logits / temperature, tempered)
    return _plus_terms(loss, logits, lambda: target, ordinal_weight, confidence_weight, ordinal, kind, margin)


def graded_distillation_loss(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    grades: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ordinal_weight: float = 0.5,
    confidence_weight: float = 0.1,
    kind: ConfidenceKind = "margin",
    ordinal: OrdinalKind = "emd",
    margin: float = DEFAULT_MARGIN,
    ignore_index: int = -1,
) -> torch.Tensor:
    """``L = α · soft_graded_loss(z, p; T) + (1 − α) · graded_loss(z, y)``: the graded counterpart of
    :func:`darl_lite.distill.losses.distillation_loss`.

    Both halves carry the ordinal and over-confidence terms, so their total weight stays ``λ_o`` and
    ``λ_c`` whatever ``α``. As in ``distillation_loss``, a batch without any human grade uses the
    soft half at full weight, and ``α = 1`` is pure distillation.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1]; got {alpha}")
    soft = soft_graded_loss(
        logits,
        target_probs,
        ordinal_weight=ordinal_weight,
        confidence_weight=confidence_weight,
        kind=kind,
        ordinal=ordinal,
        margin=margin,
        temperature=temperature,
    )
    graded = _graded_rows(logits, grades, ignore_index)
    if alpha == 1.0 or not bool(graded.any()):
        return soft
    hard = graded_loss(
        logits,
        grades,
        ordinal_weight=ordinal_weight,
        confidence_weight=confidence_weight,
        kind=kind,
        ordinal=ordinal,
        margin=margin,
        ignore_index=ignore_index,
    )
    return alpha * soft + (1.0 - alpha) * hard
