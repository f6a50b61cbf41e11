"""The batch planner's cut before longer pairs: bounds, caps, and identical scores either way (fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from darl_lite import Scorer, SessionConfig, inference
from darl_lite.inference import batch_bounds


def test_bounds_cover_every_pair_once_in_order_within_the_cap() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 32, 33, 100, 1000):
        lengths = sorted(rng.integers(5, 60, n).tolist())
        for cost in (0, 16, 1e9):
            bounds = batch_bounds(lengths, 32, cost)
            assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
            assert all(0 < b - a <= 32 for a, b in bounds)


def test_cut_where_padding_costs_more_than_a_run() -> None:
    lengths = [9, 11, 11, 12, 13, 14, 16, 16, 16, 22]  # the latency suite's 10-item request
    assert batch_bounds(lengths, 32, 0) == [(0, 10)]  # off: one batch padded to 22
    assert batch_bounds(lengths, 32, 16) == [(0, 9), (9, 10)]  # 9 rows x 6 tokens > 16: cut
    assert batch_bounds([5] * 70, 32, 16) == [(0, 32), (32, 64), (64, 70)]  # equal lengths: the cap


def test_scores_do_not_depend_on_the_cut_in_fp32(
    tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = Scorer.load(tiny_bundle_dir, precision="fp32", session=SessionConfig(intra_op_threads=1))
    items = ["a", "a much longer item title with many words in it", "mid length item", "b", "c d e f g h i j"]
    cut = scorer.score_arrays(["szechwan cuisine"] * len(items), items)
    monkeypatch.setattr(inference, "RUN_COST_TOKENS", 0)
    whole = scorer.score_arrays(["szechwan cuisine"] * len(items), items)
    np.testing.assert_allclose(cut.probabilities, whole.probabilities, atol=1e-6)
