"""The graded loss against values worked out by hand, plus gradient sanity.

The running example: two pairs, three grades.
    z_1 = [0, ln 2, 0]  ->  q_1 = [1/4, 1/2, 1/4],  true grade y_1 = 2 (strong)
    z_2 = [ln 2, 0, 0]  ->  q_2 = [1/2, 1/4, 1/4],  true grade y_2 = 0 (irrelevant)
CDFs (first C−1 entries): F_q1 = [1/4, 3/4], F_q2 = [1/2, 3/4].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest

torch = pytest.importorskip("torch")
if TYPE_CHECKING:
    from torch import Tensor

from darl_lite.distill.graded_loss import (  # noqa: E402
    confidence_penalty,
    cumulative_bce,
    emd_loss,
    expected_grade_distance,
    graded_cross_entropy,
    graded_distillation_loss,
    graded_loss,
    margin_penalty,
    ordinal_loss,
    overconfidence_loss,
    soft_cross_entropy,
    soft_graded_loss,
)
from darl_lite.distill.losses import distillation_loss  # noqa: E402
from darl_lite.errors import InputError  # noqa: E402

LN2 = math.log(2.0)
LN3_4 = math.log(0.75)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def logits() -> Tensor:
    return torch.tensor([[0.0, LN2, 0.0], [LN2, 0.0, 0.0]], dtype=torch.float64)


GRADES = torch.tensor([2, 0])
ONE_HOT = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
# Soft targets: pair 1 split between weak and strong, pair 2 surely irrelevant.
SOFT = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)


def close(value: Tensor, expected: float) -> None:
    assert float(value) == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Cross-entropy


def test_graded_cross_entropy_by_hand():
    # −ln q_1[2] = −ln 1/4 = 2 ln 2 ; −ln q_2[0] = −ln 1/2 = ln 2 ; mean = 1.5 ln 2 = 1.0397208
    close(graded_cross_entropy(logits(), GRADES), 1.5 * LN2)
    close(soft_cross_entropy(logits(), ONE_HOT), 1.5 * LN2)


def test_soft_cross_entropy_by_hand():
    # pair 1: −(1/2 ln 1/2 + 1/2 ln 1/4) = 1/2 ln 2 + ln 2 = 1.5 ln 2 ; pair 2: ln 2 ; mean = 1.25 ln 2
    close(soft_cross_entropy(logits(), SOFT), 1.25 * LN2)


def test_cross_entropy_skips_ungraded_rows_and_is_zero_when_none():
    close(graded_cross_entropy(logits(), torch.tensor([2, -1])), 2 * LN2)
    z = logits().requires_grad_(True)
    loss = graded_cross_entropy(z, torch.tensor([-1, -1]))
    loss.backward()
    assert float(loss) == 0.0 and z.grad is not None and float(z.grad.abs().sum()) == 0.0


# --------------------------------------------------------------------------------------------------
# Ordinal terms


def test_expected_grade_distance_by_hand():
    # pair 1 (y=2): 1/4·2 + 1/2·1 + 1/4·0 = 1 ; pair 2 (y=0): 1/2·0 + 1/4·1 + 1/4·2 = 3/4 ; mean 7/8
    close(expected_grade_distance(logits(), GRADES), 0.875)
    # squared: pair 1: 1/4·4 + 1/2·1 = 1.5 ; pair 2: 1/4·1 + 1/4·4 = 1.25 ; mean 1.375
    close(expected_grade_distance(logits(), GRADES, power=2), 1.375)


def test_emd_equals_expected_distance_for_hard_grades():
    # pair 1: |1/4 − 0| + |3/4 − 0| = 1 ; pair 2: |1/2 − 1| + |3/4 − 1| = 3/4 ; mean 7/8
    close(emd_loss(logits(), ONE_HOT), 0.875)


def test_emd_soft_and_squared_by_hand():
    # soft, pair 1: F_p = [0, 1/2]: |1/4| + |3/4 − 1/2| = 1/2 ; pair 2: 3/4 (as above) ; mean 5/8
    close(emd_loss(logits(), SOFT), 0.625)
    # squared, one-hot: pair 1: 1/16 + 9/16 = 10/16 ; pair 2: 1/4 + 1/16 = 5/16 ; mean 15/32
    close(emd_loss(logits(), ONE_HOT, power=2), 15 / 32)
    close(ordinal_loss(logits(), ONE_HOT, "emd2"), 15 / 32)


def test_emd_is_zero_only_at_the_target():
    target = torch.softmax(logits(), dim=-1)
    close(emd_loss(logits(), target), 0.0)


def test_cumulative_bce_by_hand():
    # P(grade > k) = 1 − F_q(k): pair 1 [3/4, 1/4], targets 1[2 > k] = [1, 1]:
    #   −ln 3/4 − ln 1/4 = −ln 3/4 + 2 ln 2
    # pair 2 [1/2, 1/4], targets 1[0 > k] = [0, 0]: −ln 1/2 − ln 3/4 = ln 2 − ln 3/4
    expected = ((-LN3_4 + 2 * LN2) + (LN2 - LN3_4)) / 2  # = 1.3274026
    close(cumulative_bce(logits(), ONE_HOT), expected)
    close(ordinal_loss(logits(), ONE_HOT, "cumulative"), expected)


def test_ordinal_term_ranks_the_errors_but_cross_entropy_does_not():
    # A strong pair (y=2) predicted irrelevant vs weak, with the same confidence: CE is equal,
    # the ordinal term is larger for the farther mistake.
    as_irrelevant = torch.tensor([[2.0, 0.0, 0.0]])
    as_weak = torch.tensor([[0.0, 2.0, 0.0]])
    y = torch.tensor([2])
    assert float(graded_cross_entropy(as_irrelevant, y)) == pytest.approx(
        float(graded_cross_entropy(as_weak, y))
    )
    for kind in ("emd", "emd2", "cumulative"):
        target = torch.tensor([[0.0, 0.0, 1.0]])
        assert float(ordinal_loss(as_irrelevant, target, kind)) > float(ordinal_loss(as_weak, target, kind))
    assert float(graded_loss(as_irrelevant, y)) > float(graded_loss(as_weak, y))


# --------------------------------------------------------------------------------------------------
# Over-confidence terms


def test_confidence_penalty_by_hand():
    # H(q_1) = H(q_2) = −(2 · 1/4 ln 1/4 + 1/2 ln 1/2) = ln 2 + 1/2 ln 2 = 1.5 ln 2 ; penalty = −H
    close(confidence_penalty(logits()), -1.5 * LN2)
    close(overconfidence_loss(logits(), "confidence"), -1.5 * LN2)


def test_margin_penalty_by_hand():
    # gaps d = max z − z: pair 1 [ln 2, 0, ln 2], pair 2 [0, ln 2, ln 2]; margin 0.5:
    # each pair: 2 · (ln 2 − 0.5) ; mean over N·C = 6 entries: 4 (ln 2 − 0.5) / 6
    close(margin_penalty(logits(), margin=0.5), 4 * (LN2 - 0.5) / 6)  # = 0.1287648
    close(margin_penalty(logits(), margin=1.0), 0.0)  # every gap within the margin
    close(overconfidence_loss(logits(), "none"), 0.0)


# --------------------------------------------------------------------------------------------------
# Combined losses


def test_graded_loss_by_hand():
    ce, ordinal = 1.5 * LN2, 0.875
    margin = 4 * (LN2 - 0.5) / 6
    close(
        graded_loss(logits(), GRADES, ordinal_weight=0.5, confidence_weight=0.1, kind="margin", margin=0.5),
        ce + 0.5 * ordinal + 0.1 * margin,  # = 1.4900973
    )
    close(
        graded_loss(logits(), GRADES, ordinal_weight=0.5, confidence_weight=0.1, kind="confidence"),
        ce + 0.5 * ordinal - 0.1 * 1.5 * LN2,  # = 1.3732487
    )
    close(graded_loss(logits(), GRADES, ordinal_weight=0.0, confidence_weight=0.0), ce)


def test_soft_graded_loss_by_hand():
    # 1.25 ln 2 + 0.5 · 5/8 − 0.1 · 1.5 ln 2 = 1.0749623
    close(
        soft_graded_loss(logits(), SOFT, ordinal_weight=0.5, confidence_weight=0.1, kind="confidence"),
        1.25 * LN2 + 0.5 * 0.625 - 0.1 * 1.5 * LN2,
    )
    # one-hot targets at T = 1 reproduce the hard graded loss
    close(
        soft_graded_loss(logits(), ONE_HOT, margin=0.5),
        float(graded_loss(logits(), GRADES, margin=0.5)),
    )


def test_soft_graded_loss_temperature_matches_the_kl_convention():
    # CE at temperature T differs from soft_kl_loss by the constant T² · H(p^T) only: compare gradients.
    z1 = logits().clone().requires_grad_(True)
    z2 = logits().clone().requires_grad_(True)
    soft_graded_loss(z1, SOFT, ordinal_weight=0.0, confidence_weight=0.0, temperature=2.0).backward()
    distillation_loss(z2, SOFT, torch.tensor([-1, -1]), temperature=2.0, alpha=1.0).backward()
    assert z1.grad is not None and z2.grad is not None
    assert torch.allclose(z1.grad, z2.grad, atol=1e-12)


def test_graded_distillation_loss_mixes_and_falls_back():
    kw = {"ordinal_weight": 0.5, "confidence_weight": 0.1, "kind": "confidence", "temperature": 1.0}
    soft = float(
        soft_graded_loss(logits(), SOFT, ordinal_weight=0.5, confidence_weight=0.1, kind="confidence")
    )
    hard = float(graded_loss(logits(), GRADES, ordinal_weight=0.5, confidence_weight=0.1, kind="confidence"))
    close(graded_distillation_loss(logits(), SOFT, GRADES, alpha=0.25, **kw), 0.25 * soft + 0.75 * hard)
    close(graded_distillation_loss(logits(), SOFT, torch.tensor([-1, -1]), alpha=0.25, **kw), soft)
    close(graded_distillation_loss(logits(), SOFT, GRADES, alpha=1.0, **kw), soft)


def test_gradients_are_finite_and_point_the_right_way():
    z = logits().clone().requires_grad_(True)
    # CE gradient of pair 1: (q − onehot)/N = [1/8, 1/4, −3/8]; ordinal (weight 2): 2 · [1/8, 0, −1/8]
    graded_loss(z, GRADES, ordinal_weight=2.0, confidence_weight=0.1).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # raising the true grade's logit lowers the loss; pair 1 (strong): the irrelevant logit gets
    # the largest push down of all (it is the farthest mistake): 3/8 against 1/4
    assert z.grad[0, 2] < 0 and z.grad[1, 0] < 0
    assert z.grad[0, 0] > z.grad[0, 1] > 0
    assert torch.allclose(z.grad[0], torch.tensor([0.375, 0.25, -0.625], dtype=torch.float64))
    # ordinal term alone, hand value: ∂E/∂z_j = q_j (d_j − E) / N, pair 1: E = 1, d = [2, 1, 0]
    z = logits().clone().requires_grad_(True)
    expected_grade_distance(z, GRADES).backward()
    assert z.grad is not None
    assert torch.allclose(z.grad[0], torch.tensor([0.125, 0.0, -0.125], dtype=torch.float64))


def test_saturated_logits_stay_finite():
    z = torch.tensor([[80.0, -80.0, -80.0], [-80.0, -80.0, 80.0]], requires_grad=True)
    for kind in ("margin", "confidence"):
        for ordinal in ("emd", "emd2", "cumulative"):
            z.grad = None
            loss = graded_loss(z, torch.tensor([2, 0]), kind=kind, ordinal=ordinal)
            loss.backward()
            assert torch.isfinite(loss) and z.grad is not None and torch.isfinite(z.grad).all()


def test_margin_penalty_pulls_the_gap_in():
    z = torch.tensor([[6.0, 0.0, 0.0]], requires_grad=True)
    margin_penalty(z, margin=3.0).backward()
    assert z.grad is not None
    assert z.grad[0, 0] > 0 and z.grad[0, 1] < 0 and z.grad[0, 2] < 0  # descent shrinks the gap


@pytest.mark.parametrize(
    "call",
    [
        lambda: graded_loss(torch.zeros(3), torch.tensor([0, 1, 2])),
        lambda: graded_loss(torch.zeros(2, 3), torch.tensor([0, 3])),
        lambda: graded_loss(torch.zeros(2, 3), torch.tensor([0])),
        lambda: graded_loss(torch.zeros(2, 3), torch.tensor([0, 1]), ordinal_weight=-1.0),
        lambda: soft_graded_loss(torch.zeros(2, 3), torch.zeros(2, 2)),
        lambda: soft_graded_loss(torch.zeros(2, 3), SOFT.float(), temperature=0.0),
        lambda: ordinal_loss(torch.zeros(2, 3), SOFT.float(), "coral"),
        lambda: overconfidence_loss(torch.zeros(2, 3), "smooth"),
        lambda: margin_penalty(torch.zeros(2, 3), margin=-1.0),
        lambda: graded_distillation_loss(torch.zeros(2, 3), SOFT.float(), GRADES, alpha=1.5),
    ],
)
def test_bad_inputs_are_refused(call):
    with pytest.raises(InputError):
        call()
