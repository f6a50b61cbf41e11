"""DASA on synthetic features: planted out-of-distribution samples, caps, diversity, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from darl_lite.errors import InputError

pytest.importorskip("torch")  # darl_lite.distill checks the distill extra on import

from darl_lite.distill.dasa import (
    SelectionResult,
    detector_scores,
    human_labeler,
    knn_distance,
    label_selection,
    random_selection,
    rank_normalise,
    select_augmentation,
    training_spacing,
)
from darl_lite.types import Pair

D = 8


def clusters(rng: np.random.Generator, n_per_class: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Three in-distribution classes around 3 directions."""
    centres = np.zeros((3, D))
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 4.0
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), D)), labels


def pool_with_plants(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Train features/labels, and a pool of 100 in-distribution rows + 20 planted OOD rows (query q_ood*)."""
    rng = np.random.default_rng(seed)
    train_x, train_y = clusters(rng)
    pool_id, _ = clusters(rng, n_per_class=34)
    pool_id = pool_id[:100]
    # A shifted Gaussian cluster, as spread as a training class but along a direction none uses.
    shifted = np.zeros(D)
    shifted[6] = 4.0
    planted = shifted + rng.normal(size=(20, D))
    pool = np.concatenate([pool_id, planted])
    query_ids = [f"q_id{i % 10}" for i in range(100)] + [f"q_ood{i % 2}" for i in range(20)]
    is_planted = np.arange(len(pool)) >= 100
    return train_x, train_y, pool, query_ids, is_planted


def test_knn_distance_by_hand_and_chunked():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = np.array([[2.0, 0.0], [-1.0, 0.0]])
    # query 0 = direction (1, 0): cos to train = [1, 0, 1/√2]; 1st NN distance 0, 2nd 1 − 1/√2
    # query 1 = (−1, 0): cos = [−1, 0, −1/√2]; 1st NN distance 1 (the (0, 1) row)
    d1 = knn_distance(train, query, k=1)
    d2 = knn_distance(train, query, k=2)
    assert d1 == pytest.approx([0.0, 1.0], abs=1e-6)
    assert d2 == pytest.approx([1 - 2**-0.5, 1 + 2**-0.5], abs=1e-6)
    # one query row per block gives the same answer
    assert knn_distance(train, query, k=2, max_block=3) == pytest.approx(d2, abs=1e-6)
    # spacing of the training rows: 1st neighbour of each (self skipped) at 1 − 1/√2
    assert training_spacing(train, k=1) == pytest.approx(1 - 2**-0.5, abs=1e-6)


def test_rank_normalise_by_hand():
    assert rank_normalise(np.array([10.0, 30.0, 20.0, 20.0])).tolist() == pytest.approx([0, 1, 0.5, 0.5])
    assert rank_normalise(np.array([3.0])).tolist() == [0.5]


def test_detectors_rank_planted_samples_highest_and_the_combination_best():
    train_x, train_y, pool, _, planted = pool_with_plants()
    scores = detector_scores(train_x, train_y, pool, k=5)
    beats_every_id = {
        name: float((scores[name][planted] > scores[name][~planted].max()).mean())
        for name in ("mahalanobis", "knn", "combined")
    }
    # each detector alone lets a few planted rows fall among in-distribution tails; their rank
    # average puts all 20 above every in-distribution row
    assert beats_every_id["mahalanobis"] >= 0.75 and beats_every_id["knn"] >= 0.75
    assert beats_every_id["combined"] == 1.0


def test_dasa_selects_planted_samples_over_in_distribution_ones():
    train_x, train_y, pool, query_ids, planted = pool_with_plants()
    result = select_augmentation(train_x, train_y, pool, query_ids, 10, k=5, seed=0)
    assert isinstance(result, SelectionResult) and len(result) == 10
    assert all(planted[i] for i in result.indices)
    assert len(set(result.indices)) == 10
    assert set(result.detector_scores) == {"mahalanobis", "knn"}
    assert all(isinstance(v, float) for v in result.scores)
    # random control of equal size picks mostly in-distribution rows (100 of 120 are)
    control = random_selection(len(pool), 10, seed=0)
    assert len(control) == 10 and control.method == "random"
    assert sum(planted[i] for i in control.indices) < 10


def test_per_query_cap_holds():
    train_x, train_y, pool, query_ids, planted = pool_with_plants()
    result = select_augmentation(train_x, train_y, pool, query_ids, 10, k=5, per_query_cap=3, seed=0)
    counts: dict[str, int] = {}
    for i in result.indices:
        counts[query_ids[i]] = counts.get(query_ids[i], 0) + 1
    assert len(result) == 10 and max(counts.values()) <= 3
    # the two planted queries give their 3 each; the rest comes from in-distribution queries
    assert sum(planted[i] for i in result.indices) == 6
    control = random_selection(len(pool), 10, pool_query_ids=query_ids, per_query_cap=1, seed=3)
    assert len({query_ids[i] for i in control.indices}) == 10


def test_cap_exhaustion_returns_what_the_caps_allow():
    train_x, train_y, pool, _, _ = pool_with_plants()
    one_query = ["q"] * len(pool)
    assert len(select_augmentation(train_x, train_y, pool, one_query, 5, k=5, per_query_cap=2)) == 2


def test_diversity_spreads_the_budget_over_distinct_ood_regions():
    rng = np.random.default_rng(1)
    train_x, train_y = clusters(rng)
    far = np.zeros(D)
    far[6] = 12.0  # a big, tight, very far cluster: its 40 rows outrank everything
    near = np.zeros(D)
    near[4] = 7.0  # a small, less extreme one
    pool = np.concatenate([far + 0.05 * rng.normal(size=(40, D)), near + 0.05 * rng.normal(size=(4, D))])
    result = select_augmentation(train_x, train_y, pool, None, 6, k=5, candidate_factor=10)
    picked_near = [i for i in result.indices if i >= 40]
    assert picked_near, "farthest-point selection should reach the second OOD region"
    # plain top-k by score would take only the far cluster
    combined = detector_scores(train_x, train_y, pool, k=5)["combined"]
    assert all(i < 40 for i in np.argsort(-combined)[:6])


def test_deterministic_with_a_seed():
    train_x, train_y, pool, query_ids, _ = pool_with_plants()
    a = select_augmentation(train_x, train_y, pool, query_ids, 12, k=5, per_query_cap=4, seed=7)
    b = select_augmentation(train_x, train_y, pool, query_ids, 12, k=5, per_query_cap=4, seed=7)
    assert a == b
    assert random_selection(120, 12, seed=7) == random_selection(120, 12, seed=7)
    assert random_selection(120, 12, seed=7) != random_selection(120, 12, seed=8)


def test_zero_budget_and_bad_inputs():
    train_x, train_y, pool, query_ids, _ = pool_with_plants()
    assert len(select_augmentation(train_x, train_y, pool, query_ids, 0)) == 0
    with pytest.raises(InputError, match="exceeds the pool size"):
        select_augmentation(train_x, train_y, pool, query_ids, 1000)
    with pytest.raises(InputError, match="one id per pool row"):
        select_augmentation(train_x, train_y, pool, query_ids[:3], 5)
    with pytest.raises(InputError, match="same width"):
        select_augmentation(train_x, train_y, pool[:, :4], None, 5)
    with pytest.raises(InputError, match="k must lie"):
        knn_distance(train_x, pool, k=len(train_x) + 1)
    with pytest.raises(InputError, match="per_query_cap"):
        random_selection(10, 2, per_query_cap=0)


def test_labels_come_only_for_the_selection():
    pool = [Pair("q", f"item {i}", grade=i % 3, query_id="q") for i in range(6)]
    selection = SelectionResult(indices=(4, 1), scores=(0.9, 0.8))
    chosen, probs = label_selection(pool, selection, human_labeler)
    assert [p.item for p in chosen] == ["item 4", "item 1"]
    assert probs.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(InputError, match="needs a grade"):
        human_labeler([Pair("q", "x")])
    with pytest.raises(InputError, match="labeler must return"):
        label_selection(pool, selection, lambda pairs: np.ones((len(pairs), 3)))
