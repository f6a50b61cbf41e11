"""A small call planned row by row (darl_lite.small_call) makes the array path's plan and answers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darl_lite.budget import RouteBudget
from darl_lite.cascade import plan_call
from darl_lite.datasets import Splits
from darl_lite.errors import BundleError
from darl_lite.llm.adapters import teacher_fallback
from darl_lite.routing import RoutingPolicy
from darl_lite.scorer import Scorer, flatten_query
from darl_lite.shift import fit_query_shift
from darl_lite.shift_routing import ShiftKind, ShiftRouting
from darl_lite.small_call import NOTE_NO_FALLBACK, SMALL_CALL_PAIRS, plan_rows
from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

IN_DISTRIBUTION = ["red shoes", "cheap laptop bag", "shoes men", "laptop sleeve"]
SHIFTED = ["which shoe is best?", "who sells bags?", "what is a laptop?", "which bag is cheap?"]
QUANTILES = ((0.0, 0.0), (0.1, 0.3), (0.5, 1.0), (1.0, 3.0))


def _shift(route_lists: bool, route_pairs: bool, biases: bool, quantiles: bool) -> ShiftRouting:
    detector = fit_query_shift(IN_DISTRIBUTION, SHIFTED, min_count=1)
    kind = ShiftKind(
        "questions",
        detector,
        0.5,
        route_lists,
        route_pairs,
        (0.0, 0.5, 1.0) if biases else None,
        list_top_k=2,
    )
    return ShiftRouting(
        (kind,),
        list_reserve_pairs=3,
        in_distribution_bias=(0.0, 0.25, 0.75) if biases else None,
        pair_margin_threshold=0.8 if quantiles else None,
        pair_margin_quantiles=QUANTILES if quantiles else (),
    )


POLICIES = [
    RoutingPolicy(error_threshold=0.3, max_route_fraction=0.5),
    RoutingPolicy(error_threshold=0.1, max_route_fraction=1.0),
    RoutingPolicy(margin_threshold=0.4, ood_threshold=2.0, max_route_fraction=0.25),
    RoutingPolicy(margin_threshold=0.2, max_route_fraction=0.75),
]


def _budget(filled: int) -> RouteBudget:
    budget = RouteBudget(0.3, window_s=100, clock=lambda: 0.0)
    if filled:
        budget.acquire(filled, 0)
    return budget


def _random_call(
    rng: random.Random, n: int, shifted_share: float
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    queries = []
    for _ in range(rng.randint(1, 3)):  # a call holds one to three queries' lists
        pool = SHIFTED if rng.random() < shifted_share else IN_DISTRIBUTION
        queries.append(rng.choice(pool))
    per_pair = [queries[min(i * len(queries) // n, len(queries) - 1)] for i in range(n)]
    logits = np.asarray([[rng.gauss(0, 2) for _ in range(3)] for _ in range(n)], np.float32)
    ood = np.asarray([rng.uniform(0, 4) for _ in range(n)], np.float32)
    return logits, ood, per_pair


@pytest.mark.parametrize("route_lists", [False, True])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("quantiles", [False, True])
def test_row_plan_is_the_array_plan_on_random_calls(route_lists: bool, biases: bool, quantiles: bool) -> None:
    rng = random.Random(f"{route_lists}{biases}{quantiles}")
    covered = declined = 0
    for trial in range(240):
        shift = None if trial % 6 == 0 else _shift(route_lists, trial % 4 != 1, biases, quantiles)
        policy = POLICIES[trial % len(POLICIES)]
        n = rng.randint(1, SMALL_CALL_PAIRS)
        logits, ood, queries = _random_call(rng, n, shifted_share=0.4)
        budgets = [None, None] if trial % 3 == 0 else [_budget(trial % 7 * 5), _budget(trial % 7 * 5)]
        args: dict[str, Any] = {"temperature": 1.3, "policy": policy, "shift": shift}
        rows = plan_rows(logits.tolist(), ood.tolist(), queries, budget=budgets[0], **args)
        if rows is None:  # only a query of a kind that routes whole lists is declined here
            assert shift is not None and route_lists
            assert shift.assign(queries).kind.max() >= 0
            if budgets[0] is not None:
                assert budgets[0].usage() == _budget(trial % 7 * 5).usage()  # nothing drawn
            declined += 1
            continue
        arrays = plan_call(logits, ood.astype(np.float64), queries, budget=budgets[1], **args)
        covered += 1
        assert rows.grades == arrays.grades.tolist()
        assert rows.candidate == arrays.candidate.tolist()
        assert rows.routed == arrays.routed.tolist()
        assert not arrays.list_routed.any()
        assert rows.notes == arrays.notes
        assert arrays.population is not None and rows.population == arrays.population.tolist()
        assert rows.query_shift == arrays.query_shift.tolist()
        np.testing.assert_allclose(rows.student, arrays.student, rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows.urgency, arrays.urgency, rtol=0, atol=1e-12)
        if budgets[0] is not None:
            assert budgets[0].usage() == budgets[1].usage()
        back = rows.to_call_plan()
        assert back.routed.tolist() == rows.routed and back.student.shape == arrays.student.shape
    assert covered > 100
    assert declined > 0 if route_lists else declined == 0


def test_calls_the_rows_do_not_cover_are_declined_before_drawing_the_budget() -> None:
    shift = _shift(False, True, True, True)
    policy = RoutingPolicy(error_threshold=0.1)
    budget = _budget(10)
    before = budget.usage()
    nan = [[0.1, float("nan"), 0.2]]
    assert (
        plan_rows(nan, [0.5], ["red shoes"], temperature=1.0, policy=policy, shift=shift, budget=budget)
        is None
    )
    assert plan_rows([[0.1, 0.2, 0.3]], [float("inf")], ["red shoes"], temperature=1.0, policy=policy) is None
    assert budget.usage() == before
    wide = ShiftRouting(shift.kinds, in_distribution_bias=(0.0, 1.0))  # 2 biases for 3 grades
    logits = [[0.1, 0.2, 0.3]]
    assert plan_rows(logits, [0.5], ["red shoes"], temperature=1.0, policy=policy, shift=wide) is None
    with pytest.raises(BundleError, match="2 logit biases for 3 grades"):  # the array path names it
        plan_call(
            np.asarray(logits), np.asarray([0.5]), ["red shoes"], temperature=1.0, policy=policy, shift=wide
        )
    zero = RoutingPolicy(margin_threshold=0.2, ood_threshold=0.0)
    assert plan_rows(logits, [0.5], ["red shoes"], temperature=1.0, policy=zero) is None


def _array_results(scorer: Scorer, query: str, items: list[str]) -> list:
    flat = flatten_query(query, items)
    return scorer._to_results(scorer.score_arrays(flat.queries, flat.items))


@pytest.fixture(scope="module")
def teacher() -> FileTeacher:
    return FileTeacher.from_file(shipped_teacher_path())


def test_small_calls_answer_as_the_array_path_on_a_real_bundle(
    tiny_bundle_dir: Path, splits: Splits, teacher: FileTeacher
) -> None:
    by_query: dict[str, list[str]] = {}
    for pair in splits.dev:
        by_query.setdefault(pair.query, []).append(pair.item)
    lists = [(q, items) for q, items in by_query.items() if len(items) >= SMALL_CALL_PAIRS][:6]
    routes_all = RoutingPolicy(error_threshold=0.0, max_route_fraction=1.0)
    scorers = {
        "shipped routing": Scorer.load(tiny_bundle_dir),
        "every pair routed, no fallback": Scorer.load(tiny_bundle_dir, routing=routes_all),
        "every pair routed to the teacher": Scorer.load(
            tiny_bundle_dir, routing=routes_all, fallback=teacher_fallback(teacher)
        ),
    }
    for name, scorer in scorers.items():
        for k, (query, items) in enumerate(lists):
            n = (1, 2, 5, 9, SMALL_CALL_PAIRS, SMALL_CALL_PAIRS + 1)[k]
            row, array = scorer.score(query, items[:n]), _array_results(scorer, query, items[:n])
            assert row == array, name
            if name != "shipped routing":
                assert all(r.routed for r in row)
                if "teacher" in name:
                    assert {r.source for r in row} == {"llm"}
                else:
                    assert {r.note for r in row} == {NOTE_NO_FALLBACK}
    mixed = [(q, item) for q, items in lists for item in items[:2]]  # predict: several queries in a call
    shipped = scorers["shipped routing"]
    queries, items = [q for q, _ in mixed], [item for _, item in mixed]
    assert shipped.predict(mixed) == shipped._to_results(shipped.score_arrays(queries, items))
