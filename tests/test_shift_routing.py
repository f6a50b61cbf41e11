"""Query-level shift detection, distribution-aware routing and the budget rules they rely on."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

from darl_lite.budget import RouteBudget
from darl_lite.cascade import NOTE_LIST_BUDGET, plan_call
from darl_lite.cascade_fit import (
    GradedEvidence,
    bootstrap_gains,
    bootstrap_mean_interval,
    choose_grade_weight,
    choose_list_top_k,
    fit_in_distribution_bias,
    fit_logit_bias,
    fit_shift_kind,
    lists_pay,
    pair_margin_threshold_for,
)
from darl_lite.decision_margin import (
    decision_margins,
    list_heads,
    margin_quantiles,
    margin_threshold_for_rate,
)
from darl_lite.errors import BundleError, InputError
from darl_lite.metrics import auroc, macro_f1
from darl_lite.routing import RoutingPolicy
from darl_lite.shift import QueryShiftDetector, fit_query_shift, query_tokens
from darl_lite.shift_routing import ShiftKind, ShiftRouting


def _queries(splits, name: str) -> list[str]:
    return sorted({p.query for p in splits.split(name)})


def test_tokens_keep_question_marks_and_case_fold() -> None:
    assert query_tokens("Who is the Mayor of Berlin?") == ["who", "is", "the", "mayor", "of", "berlin", "?"]


def test_domain_classifier_separates_questions_from_keywords_on_held_out_queries(splits) -> None:
    detector = fit_query_shift(_queries(splits, "train"), _queries(splits, "ood_train"), l2=0.1)
    score = auroc(
        detector.probabilities(_queries(splits, "dev")), detector.probabilities(_queries(splits, "ood_dev"))
    )
    assert score >= 0.9
    assert detector.probability("Which rivers flow through Germany?") > 0.5
    assert detector.probability("rivers germany") < 0.5


def test_detector_json_round_trip_and_refusals(tmp_path) -> None:
    detector = fit_query_shift(
        ["red shoes", "cheap laptop bag"], ["which shoe is best?", "who sells bags?"], min_count=1
    )
    loaded = QueryShiftDetector.from_json(json.loads(json.dumps(detector.to_json())))
    for q in ("red shoes", "who is best?", "unseen words only"):
        assert loaded.probability(q) == pytest.approx(detector.probability(q), abs=1e-12)
    bad = detector.to_json() | {"bias": float("nan")}
    with pytest.raises(BundleError, match="non-finite"):
        QueryShiftDetector.from_json(bad)
    with pytest.raises(BundleError, match="format"):
        QueryShiftDetector.from_json({"format": "other"})
    with pytest.raises(InputError, match="both sides"):
        fit_query_shift(["a"], [])


def _routing(
    route_lists: bool = True, bias: tuple[float, ...] | None = None, in_bias: tuple[float, ...] | None = None
) -> ShiftRouting:
    detector = fit_query_shift(
        ["red shoes", "cheap laptop bag", "shoes men", "laptop sleeve"],
        ["which shoe is best?", "who sells bags?", "what is a laptop?", "which bag is cheap?"],
        min_count=1,
    )
    return ShiftRouting(
        (ShiftKind("questions", detector, 0.5, route_lists, False, bias),),
        list_reserve_pairs=0,
        in_distribution_bias=in_bias,
    )


def _plan(
    shift: ShiftRouting | None,
    queries: list[str],
    budget: RouteBudget | None = None,
    logits: np.ndarray | None = None,
):
    n = len(queries)
    logits = np.tile([2.0, 1.9, -3.0], (n, 1)) if logits is None else logits  # the student is unsure
    policy = RoutingPolicy(error_threshold=0.3, max_route_fraction=0.5)
    return plan_call(logits, np.zeros(n), queries, temperature=1.0, policy=policy, shift=shift, budget=budget)


def test_shifted_query_goes_to_the_teacher_as_a_whole_list() -> None:
    queries = ["which shoe is best?"] * 4 + ["red shoes"] * 4
    plan = _plan(_routing(), queries)
    assert plan.list_routed.tolist() == [True] * 4 + [False] * 4
    # the in-distribution list keeps per-pair routing under the per-call cap (0.5 of 8 = 4 pairs, 4 used)
    assert plan.routed[:4].all()
    assert plan.query_shift[0] > 0.5 > plan.query_shift[-1]


def test_no_evidence_no_list_routing_and_pair_routing_follows_the_kind() -> None:
    queries = ["which shoe is best?"] * 4
    plan = _plan(_routing(route_lists=False), queries)
    assert not plan.list_routed.any()
    assert not plan.routed.any()  # route_pairs=False for the kind: the teacher is not better there
    without = _plan(None, queries)
    assert without.routed.sum() == 2  # the plain policy: likely-wrong pairs, half of the call


def test_list_routing_is_all_or_nothing_under_the_window_budget() -> None:
    budget = RouteBudget(0.5, window_s=100, clock=lambda: 0.0)
    first = _plan(_routing(), ["which shoe is best?"] * 4, budget=budget)
    assert not first.list_routed.any()  # 4 of 4 pairs would exceed half of the window
    assert first.notes[0] == NOTE_LIST_BUDGET
    budget.acquire(8, 0)  # in-distribution traffic fills the window
    second = _plan(_routing(), ["which shoe is best?"] * 4, budget=budget)
    assert second.list_routed.all()
    assert budget.usage() == (16, 4)


def test_reserve_keeps_allowance_for_lists() -> None:
    budget = RouteBudget(0.5, window_s=100, clock=lambda: 0.0)
    budget.acquire(10, 0)
    assert budget.acquire(2, 2, reserve=5) == 1  # floor(0.5 * 12) - 0 - 5
    with pytest.raises(InputError, match="reserve"):
        budget.acquire(1, 0, reserve=-1)


def test_logit_bias_moves_the_kind_s_grades_never_the_ranking() -> None:
    queries = ["which shoe is best?", "which shoe is best?", "red shoes"]
    logits = np.asarray([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0], [1.0, 0.5, 0.0]])
    plain = _plan(_routing(bias=None), queries, logits=logits)
    biased = _plan(_routing(bias=(0.0, 0.0, 2.0)), queries, logits=logits)
    assert plain.grades.tolist() == [0, 0, 0]
    assert biased.grades.tolist() == [2, 2, 0]  # the shifted query's grades move, the other's do not
    np.testing.assert_allclose(biased.student, plain.student)  # probabilities (the ranking) untouched


def test_each_population_gets_its_own_correction() -> None:
    queries = ["which shoe is best?", "red shoes", "red shoes"]
    logits = np.asarray([[1.0, 0.5, 0.0], [1.0, 0.8, 0.0], [1.0, 0.2, 0.0]])
    plan = _plan(_routing(bias=(0.0, 0.0, 2.0), in_bias=(0.0, 0.5, 0.0)), queries, logits=logits)
    assert plan.grades.tolist() == [2, 1, 0]  # kind: +2 on "strong"; the rest: +0.5 on "weak"
    plain = _plan(_routing(), queries, logits=logits)
    np.testing.assert_allclose(plan.student, plain.student)


def test_in_distribution_bias_is_fitted_on_unclaimed_pairs_only() -> None:
    rng = np.random.default_rng(1)
    routing = _routing()
    keywords = ["red shoes", "cheap laptop bag", "shoes men", "laptop sleeve"] * 150
    questions = ["which shoe is best?", "who sells bags?"] * 150
    queries = keywords + questions
    grades = rng.integers(0, 3, len(queries))
    logits = np.eye(3)[grades] * 2.0 + rng.normal(0, 0.7, (len(queries), 3))
    n_kw = len(keywords)
    logits[:n_kw, 1] -= 2.5  # in distribution the student under-predicts "weak"
    logits[n_kw:, 2] -= 2.5  # on the kind's queries it under-predicts "strong"
    teacher = np.full((len(queries), 3), 0.1)
    teacher[np.arange(len(queries)), grades] = 0.8
    teacher[:n_kw, 2] *= 0.05  # a teacher that never says "strong" in distribution...
    teacher[:n_kw] /= teacher[:n_kw].sum(1, keepdims=True)
    ev = GradedEvidence(queries, grades, logits, teacher, 1.0, (0.0, 1.0, 2.0))
    found = fit_in_distribution_bias(ev, routing)
    bias = found.student
    assert bias is not None and bias[1] > 1.0 and bias[2] <= 0.5  # the questions' prior is not its own
    assert found.fallback is not None and found.fallback[2] > 0.5  # ...gets "strong" back
    record = found.evidence
    assert record["pairs"] == n_kw and record["macro_f1"][1] > record["macro_f1"][0] + 0.05
    assert record["fallback_macro_f1"][1] > record["fallback_macro_f1"][0] + 0.05
    empty = fit_in_distribution_bias(ev, routing, is_kind=np.ones(len(queries), bool))
    assert empty.student is None and empty.fallback is None and empty.evidence["pairs"] == 0


def test_fallback_grades_follow_each_population_s_correction() -> None:
    routing = _routing()
    routing = ShiftRouting(
        (dataclasses.replace(routing.kinds[0], fallback_bias=(0.0, 0.0, 3.0)),),
        in_distribution_fallback_bias=(0.0, 1.0, 0.0),
    )
    probs = np.asarray([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    kinds = np.asarray([0, -1, -1])
    assert routing.fallback_grades(probs, kinds).tolist() == [2, 1, 1]
    assert ShiftRouting(()).fallback_grades(probs, kinds).tolist() == [0, 0, 0]  # none: argmax


def test_fallback_answer_blends_then_corrects() -> None:
    base = _routing()
    routing = ShiftRouting(
        (dataclasses.replace(base.kinds[0], fallback_bias=(0.0, 0.0, 0.9)),), teacher_weight=0.25
    )
    student = np.asarray([[0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    teacher = np.asarray([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    answer, grades = routing.fallback_answer(student, teacher, np.asarray([0, -1]))
    np.testing.assert_allclose(answer, 0.25 * teacher + 0.75 * student)
    assert grades.tolist() == [2, 0]  # row 0: blend argmax is 2 already; row 1: no correction
    alone, _ = ShiftRouting(()).fallback_answer(student, teacher, np.asarray([-1, -1]))
    np.testing.assert_array_equal(alone, teacher)  # weight 1: the teacher's own answer
    with pytest.raises(InputError, match="teacher_weight"):
        ShiftRouting((), teacher_weight=0.0)


def test_a_population_s_grading_answer_may_be_the_teacher_alone() -> None:
    base = _routing()
    routing = ShiftRouting((dataclasses.replace(base.kinds[0], grade_weight=1.0),), teacher_weight=0.5)
    student = np.asarray([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    teacher = np.asarray([[0.3, 0.3, 0.4], [0.3, 0.3, 0.4]])
    answer, grades = routing.fallback_answer(student, teacher, np.asarray([0, -1]))
    np.testing.assert_allclose(answer, 0.5 * teacher + 0.5 * student)  # both rank by the blend
    assert grades.tolist() == [2, 0]  # the kind grades by the teacher alone, the rest by the blend
    with pytest.raises(InputError, match="grade_weight"):
        ShiftRouting((), in_distribution_grade_weight=1.5)


def test_choose_grade_weight_takes_the_answer_that_grades_better_held_out() -> None:
    rng = np.random.default_rng(0)
    n = 900
    queries = [f"q{i // 30}" for i in range(n)]
    grades = rng.integers(0, 3, n)
    wrong = np.eye(3)[rng.integers(0, 3, n)]
    student_logits = np.log(0.95 * wrong + 0.05 / 3)  # a confident student that grades at random
    teacher = 0.7 * np.eye(3)[grades] + 0.1  # a teacher that knows the grades
    ev = GradedEvidence(queries, grades, student_logits, teacher, 1.0, (0.0, 1.0, 2.0), teacher_weight=0.5)
    weight, scores = choose_grade_weight(ev, seeds=2)
    assert weight == 1.0 and scores["1.0"] > scores["0.5"]
    same = GradedEvidence(queries, grades, np.log(teacher), teacher, 1.0, (0.0, 1.0, 2.0), teacher_weight=0.5)
    assert choose_grade_weight(same, seeds=2)[0] == 0.5  # equal answers: the served blend


def test_teacher_weight_round_trips_and_old_files_read_as_teacher_alone(tmp_path) -> None:
    path = tmp_path / "shift.json"
    dataclasses.replace(_routing(), teacher_weight=0.5).save(str(path))
    assert ShiftRouting.load(str(path)).teacher_weight == 0.5
    data = json.loads(path.read_text())
    del data["teacher_weight"]
    path.write_text(json.dumps(data))
    assert ShiftRouting.load(str(path)).teacher_weight == 1.0
    data["teacher_weight"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="teacher_weight"):
        ShiftRouting.load(str(path))


def test_routing_policy_takes_the_bundle_rule_unless_given_excess_thresholds() -> None:
    assert RoutingPolicy(error_threshold=0.3).rule == "expected_error"
    assert RoutingPolicy(margin_threshold=1.0).rule == "threshold_excess"
    assert RoutingPolicy().rule == "expected_error"
    with pytest.raises(InputError, match="rule"):
        RoutingPolicy(error_threshold=0.3, margin_threshold=0.5)
    assert (
        RoutingPolicy(error_threshold=0.3, margin_threshold=0.5, rule="expected_error").rule
        == "expected_error"
    )


def test_fit_logit_bias_recovers_a_shifted_prior() -> None:
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 3, 600)
    logits = np.eye(3)[grades] * 2.0 + rng.normal(0, 0.7, (600, 3))
    logits[:, 2] -= 2.5  # the student under-predicts grade 2
    ev = GradedEvidence(["q"] * 600, grades, logits, np.eye(3)[grades], 1.0, (0.0, 1.0, 2.0))
    bias, before, after = fit_logit_bias(ev)
    assert bias[0] == 0.0 and bias[2] > 1.0
    assert after > before + 0.05


def test_fit_shift_kind_routes_lists_only_where_the_teacher_ranks_better(splits) -> None:
    rng = np.random.default_rng(0)
    dev = [p for name in ("dev", "ood_dev") for p in splits.split(name)]
    grades = np.asarray([p.grade for p in dev])
    is_kind = np.asarray([name == "ood_dev" for name in ("dev", "ood_dev") for _ in splits.split(name)])
    noisy = rng.normal(0, 1.0, (len(dev), 3))
    good = np.eye(3)[grades] * 0.9 + 0.05  # a teacher that knows the grades
    student = noisy.copy()
    ev = GradedEvidence(
        [p.query for p in dev], grades, student, good / good.sum(1, keepdims=True), 1.0, (0.0, 1.0, 2.0)
    )
    fit = functools.partial(
        fit_shift_kind,
        "questions",
        reference_queries=_queries(splits, "train"),
        pool_queries=_queries(splits, "ood_train"),
        evidence_is_kind=is_kind,
    )
    kind = fit(evidence=ev)
    assert kind.route_lists and kind.evidence["ndcg_gain_ci90"][0] > 0
    assert kind.evidence["query_auroc"] >= 0.9
    # a student whose ranking is noise picks no head that keeps the gain: the whole list goes
    gains = kind.evidence["list_top_k_ndcg_gain"]
    assert kind.list_top_k is None and kind.evidence["list_share"] == 1.0
    assert all(g < gains["whole"] - 0.005 for k, g in gains.items() if k != "whole")
    margin = fit(evidence=ev, pair_margin_threshold=0.4, choose_head=False)
    assert margin.list_top_k is None and margin.evidence["pair_margin_threshold"] == 0.4
    assert margin.evidence["pair_routing_ndcg_gain"] == 0.0  # lone routed pairs never move the ranking
    bad = GradedEvidence(
        ev.queries, grades, np.eye(3)[grades] * 3.0, np.full((len(dev), 3), 1 / 3), 1.0, (0.0, 1.0, 2.0)
    )
    worse = fit(evidence=bad)
    assert not worse.route_lists and not worse.route_pairs


def test_bootstrap_gains_bracket_the_measured_gains() -> None:
    rng = np.random.default_rng(1)
    queries = [f"q{i // 20}" for i in range(400)]
    grades = rng.integers(0, 3, 400)
    student = np.where(rng.random(400) < 0.5, grades, rng.integers(0, 3, 400))
    teacher = np.where(rng.random(400) < 0.8, grades, rng.integers(0, 3, 400))
    ndcg = {f"q{i}": 0.05 + 0.02 * rng.standard_normal() for i in range(20)}
    f1_gain = macro_f1(grades, teacher, 3) - macro_f1(grades, student, 3)
    ci = bootstrap_gains(ndcg, grades, student, teacher, queries, 3)
    assert 0.0 < ci.macro_f1[0] < f1_gain < ci.macro_f1[1]
    assert ci.ndcg[0] < float(np.mean(list(ndcg.values()))) < ci.ndcg[1]
    assert ci.combined[0] > ci.macro_f1[0] and ci.combined[1] > ci.macro_f1[1]
    same = bootstrap_gains(dict.fromkeys(ndcg, 0.0), grades, student, student, queries, 3)
    assert same.macro_f1 == same.combined == (0.0, 0.0)


def _gains(
    ndcg: float,
    f1: float,
    combined_ci: tuple[float, float],
    ndcg_ci: tuple[float, float] = (-1.0, 1.0),
    f1_ci: tuple[float, float] = (-1.0, 1.0),
) -> dict:
    return {
        "ndcg_gain": ndcg,
        "macro_f1_gain": f1,
        "combined_gain_ci90": list(combined_ci),
        "ndcg_gain_ci90": list(ndcg_ci),
        "macro_f1_gain_ci90": list(f1_ci),
    }


@pytest.mark.parametrize(
    ("record", "routes"),
    [
        (_gains(0.064, 0.110, (0.02, 0.30)), True),  # both better, the sum with evidence
        (_gains(0.004, 0.136, (-0.08, 0.25)), False),  # both better on the mean, nothing established
        # grading clearly better, ranking a noisy zero that drags the sum's interval below zero
        (_gains(0.013, 0.136, (-0.02, 0.27), (-0.07, 0.10), (0.015, 0.20)), True),
        (_gains(0.05, 0.01, (-0.01, 0.12), (0.01, 0.09), (-0.03, 0.05)), True),  # ranking clearly better
        (_gains(-0.031, 0.14, (0.01, 0.25), f1_ci=(0.02, 0.25)), False),  # grades better, ranks worse
        (_gains(0.05, -0.02, (0.01, 0.09), ndcg_ci=(0.01, 0.09)), False),  # ranks better, grades worse
    ],
)
def test_lists_pay_follows_expected_gain_over_both_jobs(record: dict, routes: bool) -> None:
    assert lists_pay(record) is routes


def test_lists_pay_reads_records_without_per_job_intervals() -> None:
    record = {"ndcg_gain": 0.02, "macro_f1_gain": 0.1, "combined_gain_ci90": [0.01, 0.2]}
    assert lists_pay(record)
    assert not lists_pay({**record, "combined_gain_ci90": [-0.01, 0.2]})


def test_bootstrap_interval_brackets_the_mean() -> None:
    lo, hi = bootstrap_mean_interval([0.1, 0.2, 0.3, 0.25, 0.15])
    assert lo < 0.2 < hi


def test_shift_routing_file_round_trip(tmp_path) -> None:
    routing = _routing(bias=(0.0, 0.5, 1.0), in_bias=(0.0, 0.25, 0.75))
    path = tmp_path / "shift.json"
    routing.save(str(path))
    loaded = ShiftRouting.load(str(path))
    queries = ["which shoe is best?", "red shoes"]
    assert loaded.assign(queries).kind.tolist() == routing.assign(queries).kind.tolist()
    assert loaded.kinds[0].logit_bias == (0.0, 0.5, 1.0)
    assert loaded.in_distribution_bias == (0.0, 0.25, 0.75)
    assert loaded.with_kind(loaded.kinds[0]).in_distribution_bias == (0.0, 0.25, 0.75)
    path.write_text('{"format": "nope"}')
    with pytest.raises(BundleError, match="re-export"):
        ShiftRouting.load(str(path))


def test_a_one_query_call_is_assigned_as_in_a_mixed_call() -> None:
    """A request's query gets the same kind and probability alone as beside other queries."""
    detector = _routing().kinds[0].detector
    kinds = (
        ShiftKind("questions", detector, 0.5, True, False, None),
        ShiftKind("also-questions", detector, 0.4, True, False, None),  # ties go to the first kind
        ShiftKind("rarely", detector, 0.999, True, False, None),
    )
    routing = ShiftRouting(kinds)
    for query in ("which shoe is best?", "red shoes", "who sells a laptop bag?"):
        alone = routing.assign([query] * 3)
        mixed = routing.assign([query, "a different query?", query, "laptop sleeve", query])
        assert alone.kind.tolist() == [mixed.kind[0]] * 3
        np.testing.assert_array_equal(alone.probability, np.full(3, mixed.probability[0]))


def test_assign_takes_the_most_probable_kind_past_its_threshold() -> None:
    """Each pair's kind is the most probable kind whose threshold its query passes (-1: none), and
    its probability the largest of its kinds' probabilities, passed or not, as the detectors say."""
    base = _routing().kinds[0]
    other = QueryShiftDetector({"laptop": 3.0, "?": -2.0}, length_weight=0.0, bias=-1.0)
    kinds = (
        dataclasses.replace(base, name="questions", threshold=0.6),
        dataclasses.replace(base, name="laptops", detector=other, threshold=0.5),
    )
    routing = ShiftRouting(kinds)
    queries = ["which shoe is best?", "laptop sleeve", "red shoes", "laptop sleeve", "a laptop?"]
    assigned = routing.assign(queries)
    rows = zip(queries, assigned.kind.tolist(), assigned.probability.tolist(), strict=True)
    for query, kind, probability in rows:
        probabilities = [k.detector.probability(query) for k in kinds]
        passed = [p if p >= k.threshold else -1.0 for p, k in zip(probabilities, kinds, strict=True)]
        assert kind == (int(np.argmax(passed)) if max(passed) >= 0 else -1)
        assert probability == max(probabilities)
    assert set(assigned.kind.tolist()) == {-1, 0, 1}  # each kind claims a query, one query neither
    assert assigned.kind.dtype == np.intp and assigned.probability.dtype == np.float64


def _headed(top_k: int | None, route_pairs: bool = False, margin: float | None = None) -> ShiftRouting:
    base = _routing()
    kind = dataclasses.replace(base.kinds[0], list_top_k=top_k, route_pairs=route_pairs)
    return ShiftRouting((kind,), list_reserve_pairs=0, pair_margin_threshold=margin)


def test_a_shifted_list_sends_its_head_the_student_ranks_highest() -> None:
    queries = ["which shoe is best?"] * 6 + ["red shoes"] * 2
    # expected relevance of the shifted pairs (gains 0, 1, 2): rows 1, 4 and 5 rank highest
    logits = np.asarray(
        [[3, 0, 0], [0, 0, 3], [3, 0, 0], [2, 1, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0], [3, 0, 0]], float
    )
    plan = _plan(_headed(3), queries, logits=logits)
    assert plan.list_routed.tolist() == [False, True, False, False, True, True, False, False]
    whole = _plan(_headed(None), queries, logits=logits)
    assert whole.list_routed.tolist() == [True] * 6 + [False] * 2
    longer = _plan(_headed(10), queries, logits=logits)  # a list shorter than the head: all of it
    assert longer.list_routed.tolist() == [True] * 6 + [False] * 2


def test_list_heads_break_ties_in_input_order() -> None:
    head = list_heads(["a", "a", "b", "a", "b"], np.asarray([1.0, 1.0, 0.0, 1.0, 0.5]), 2)
    assert head.tolist() == [True, True, True, False, True]
    assert list_heads(["a", "a"], np.asarray([0.0, 1.0]), None).all()


def test_pairs_of_a_shifted_tail_may_be_routed_one_by_one_where_that_pays() -> None:
    queries = ["which shoe is best?"] * 4
    logits = np.asarray([[0, 0, 3], [2.0, 1.9, -3.0], [2.0, 1.9, -3.0], [3, 0, 0]], float)
    off = _plan(_headed(1, route_pairs=False, margin=0.5), queries, logits=logits)
    assert off.list_routed.tolist() == [True, False, False, False] and off.routed.sum() == 1
    on = _plan(_headed(1, route_pairs=True, margin=0.5), queries, logits=logits)
    # the tail's two pairs near their decision boundary (margin 0.1 < 0.5) go one by one
    assert on.routed.tolist() == [True, True, True, False] and on.list_routed.sum() == 1


def test_pair_urgency_follows_the_corrected_decision_margin() -> None:
    routing = dataclasses.replace(_routing(in_bias=(0.0, 1.0, 0.0)), pair_margin_threshold=0.5)
    logits = np.asarray([[2.0, 1.2, -3.0], [2.0, 0.0, -3.0], [1.0, 0.9, -3.0]])
    kinds = np.asarray([-1, -1, -1])
    margins = decision_margins(routing.decision_logits(logits, kinds))
    np.testing.assert_allclose(margins, [0.2, 1.0, 0.9])  # the bias moved row 0 next to its boundary
    urgency = routing.pair_urgency(logits, kinds)
    assert urgency is not None and (urgency > 0).tolist() == [True, False, False]
    # uncorrected, row 2 (margin 0.1) would have been the one; the correction says row 0
    assert ShiftRouting(()).pair_urgency(logits, kinds) is None  # no threshold: the policy's urgency


def test_the_margin_threshold_follows_the_share_the_budget_affords() -> None:
    rng = np.random.default_rng(0)
    dev_logits = rng.normal(0, 1.5, (2000, 3))
    quantiles = margin_quantiles(dev_logits)
    routing = ShiftRouting(
        (), pair_margin_threshold=margin_threshold_for_rate(dev_logits, 0.1), pair_margin_quantiles=quantiles
    )
    kinds = np.full(2000, -1)
    for share in (0.02, 0.1, 0.3):
        urgency = routing.pair_urgency(dev_logits, kinds, share)
        assert urgency is not None and (urgency > 0).mean() == pytest.approx(share, abs=0.006)
    fixed = routing.pair_urgency(dev_logits, kinds)
    assert fixed is not None and (fixed > 0).mean() == pytest.approx(0.1, abs=0.006)
    assert routing.margin_threshold(-1.0) == quantiles[0][1]  # clipped to [0, 1]
    with pytest.raises(InputError, match="rate"):
        margin_threshold_for_rate(dev_logits, 0.0)


def test_budget_pair_share_is_what_lists_leave_of_the_window() -> None:
    budget = RouteBudget(0.1, window_s=100, clock=lambda: 0.0)
    assert budget.pair_share() is None  # an empty window says nothing
    budget.acquire(900, 0)
    budget.acquire_list(100)  # asked, refused: still counted as list demand
    # (0.1 * 1000 - 100) / 900: lists asked for the whole allowance
    assert budget.pair_share() == 0.0
    budget.acquire(1000, 0)
    assert budget.pair_share() == pytest.approx((0.1 * 2000 - 100) / 1900)
    assert budget.pair_share(reserve=50) == pytest.approx((0.1 * 2000 - 150) / 1900)


def test_choose_list_top_k_takes_the_smallest_head_that_keeps_the_gain() -> None:
    rng = np.random.default_rng(0)
    n_queries, per = 12, 60
    queries = [f"q{i // per}" for i in range(n_queries * per)]
    grades = np.zeros(n_queries * per, np.int64)
    student = rng.normal(0, 0.3, (len(grades), 3))
    for q in range(n_queries):
        rows = np.arange(q * per, (q + 1) * per)
        grades[rows[:8]] = 2  # the relevant items...
        student[rows[:20], 2] += 2.0  # ...sit in the student's top 20, in a noisy order
    teacher = np.full((len(grades), 3), 0.05)
    teacher[np.arange(len(grades)), grades] = 0.9  # the teacher orders them
    ev = GradedEvidence(queries, grades, student, teacher, 1.0, (0.0, 1.0, 2.0), teacher_weight=0.5)
    top_k, gains = choose_list_top_k(ev, grid=(10, 20, 30, 40))
    assert top_k == 20 and gains["10"] < gains["whole"] - 0.005 <= gains["20"]
    far = dataclasses.replace(ev, student_logits=-student)  # relevant items at the bottom: no head will do
    assert choose_list_top_k(far, grid=(10, 20, 30, 40))[0] is None


def test_heads_and_margins_round_trip_and_bad_values_are_refused(tmp_path) -> None:
    routing = dataclasses.replace(
        _headed(50, margin=0.3), pair_margin_quantiles=((0.0, 0.0), (0.5, 0.4), (1.0, 2.0))
    )
    path = tmp_path / "shift.json"
    routing.save(str(path))
    loaded = ShiftRouting.load(str(path))
    assert loaded.kinds[0].list_top_k == 50 and loaded.pair_margin_threshold == 0.3
    assert loaded.margin_threshold(0.25) == pytest.approx(0.2)
    data = json.loads(path.read_text())
    data["kinds"][0]["list_top_k"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="list_top_k"):
        ShiftRouting.load(str(path))
    data["kinds"][0]["list_top_k"] = None
    data["pair_margin_quantiles"] = [[0.5, 1.0], [0.0, 0.0]]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="pair_margin_quantiles"):
        ShiftRouting.load(str(path))
    with pytest.raises(InputError, match="list_top_k"):
        dataclasses.replace(routing.kinds[0], list_top_k=0)


def test_pair_margin_threshold_for_asks_for_the_target_share_after_the_correction() -> None:
    rng = np.random.default_rng(2)
    grades = rng.integers(0, 3, 3000)
    logits = np.eye(3)[grades] * 2.0 + rng.normal(0, 0.8, (3000, 3))
    logits[:, 1] -= 2.0  # a prior the correction moves
    ev = GradedEvidence(
        [f"q{i // 50}" for i in range(3000)], grades, logits, np.eye(3)[grades], 1.0, (0.0, 1.0, 2.0)
    )
    threshold, quantiles = pair_margin_threshold_for(ev, 0.1)
    corrected = logits + np.asarray(fit_logit_bias(ev)[0])
    assert (decision_margins(corrected) < threshold).mean() == pytest.approx(0.1, abs=0.002)
    assert quantiles[0][0] == 0.0 and quantiles[-1][0] == 1.0 and len(quantiles) == 101
