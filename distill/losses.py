"""Distillation losses as pure tensor functions: logits and targets in, a scalar loss out.

No tokenisation or model code lives here, so every loss can be checked against numbers worked out
by hand (see ``tests/test_distill.py``). Notation, for a batch of ``N`` pairs and ``C`` ordered
grades: ``z`` student logits ``(N, C)``, ``p`` teacher probabilities ``(N, C)``, ``y`` human grades
``(N,)`` with ``-1`` where a pair has none, ``T`` the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darl_lite.errors import InputError


def _check_logits(student_logits: torch.Tensor) -> None:
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise InputError(
            f"student_logits must have shape (N, C) with C >= 2; got {tuple(student_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise InputError(f"temperature must be > 0; got {temperature}")


def tempered_teacher_probs(teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^T_c = p_c^(1/T) / sum_k p_k^(1/T)``: the teacher distribution softened (T > 1) or sharpened.

    The teacher gives probabilities, not logits, so this is the same as dividing the teacher's
    logits by ``T`` before its softmax (``log p = z_t - logsumexp(z_t)``, and the constant cancels
    in the renormalisation). Zero probabilities stay exactly zero.
    """
    _check_temperature(temperature)
    powered = teacher_probs.clamp_min(0.0).pow(1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


def soft_kl_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Temperature-scaled KL divergence from the teacher to the student (Hinton et al., 2015).

    ``L = T² · (1/N) · Σ_i Σ_c p^T_ic · (log p^T_ic − log q^T_ic)``, with
    ``q^T_i = softmax(z_i / T)`` and ``p^T_i`` from :func:`tempered_teacher_probs`; terms with
    ``p^T_ic = 0`` count 0. The ``T²`` factor keeps the gradient's scale independent of ``T``
    (``∂L/∂z_i = T · (q^T_i − p^T_i) / N``), so ``alpha`` in :func:`distillation_loss` means the
    same thing at every temperature. The teacher side is a constant (no gradient).
    """
    _check_logits(student_logits)
    if teacher_probs.shape != student_logits.shape:
        raise InputError(
            f"teacher_probs must have the shape of student_logits {tuple(student_logits.shape)}; "
            f"got {tuple(teacher_probs.shape)}"
        )
    target = tempered_teacher_probs(teacher_probs.detach().to(student_logits.dtype), temperature)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    per_pair = (torch.xlogy(target, target) - target * log_q).sum(dim=-1)
    return temperature**2 * per_pair.mean()


def hard_ce_loss(student_logits: torch.Tensor, grades: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy with the human grades: ``L = −(1/|G|) Σ_{i∈G} log softmax(z_i)_{y_i}``.

    ``G`` is the set of pairs whose grade is not ``ignore_index`` (pairs without a human grade carry
    ``-1``). When ``G`` is empty the loss is 0 (still attached to the graph, so ``backward`` works)
    rather than the NaN that ``F.cross_entropy`` returns. Grades outside ``[0, C)`` are refused.
    """
    _check_logits(student_logits)
    if grades.ndim != 1 or grades.shape[0] != student_logits.shape[0]:
        raise InputError(
            f"grades must have shape ({student_logits.shape[0]},) to match student_logits; "
            f"got {tuple(grades.shape)}"
        )
    grades = grades.long()
    graded = grades != ignore_index
    n_grades = student_logits.shape[1]
    bad = graded & ((grades < 0) | (grades >= n_grades))
    if bool(bad.any()):
        raise InputError(
            f"grades must lie in [0, {n_grades}) or equal ignore_index={ignore_index}; "
            f"got {sorted(set(grades[bad].tolist()))}"
        )
    if not bool(graded.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits[graded], grades[graded])


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    grades: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``L = α · soft_kl_loss(z, p, T) + (1 − α) · hard_ce_loss(z, y)``; pure KL when no pair is graded.

    The KL term averages over every pair of the batch, the cross-entropy term over the graded pairs
    only (human grades are sparse: most pairs are labelled by the teacher alone). A batch with no
    human grade uses ``L = soft_kl_loss`` at full weight instead of ``α`` times it, so such batches
    are not silently down-weighted. ``alpha = 1`` is pure distillation.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1]; got {alpha}")
    kl = soft_kl_loss(student_logits, teacher_probs, temperature)
    ce = hard_ce_loss(student_logits, grades)
    if alpha == 1.0 or not bool((grades != -1).any()):
        return kl
    return alpha * kl + (1.0 - alpha) * ce
