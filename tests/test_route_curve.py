"""The route curve on hand-made data, and the route-curve command on the tiny bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from darl_lite import RoutingPolicy
from darl_lite.cli import main
from darl_lite.datasets import Splits
from darl_lite.errors import InputError
from darl_lite.route_curve import node_route_curve, route_curve
from darl_lite.routing import error_threshold_for_rate


def test_router_that_knows_the_errors_beats_random() -> None:
    rng = np.random.default_rng(0)
    n = 400
    grades = rng.integers(0, 3, n)
    teacher = np.eye(3)[grades] * 0.9 + 0.1 / 3  # right everywhere
    student = teacher.copy()
    wrong = rng.random(n) < 0.3
    student[wrong] = np.eye(3)[(grades[wrong] + 1) % 3] * 0.5 + 0.5 / 3  # wrong and unsure
    urgency = RoutingPolicy(rule="expected_error").urgency(student, np.zeros(n))
    rows = route_curve(student, teacher, urgency, grades, [str(i // 20) for i in range(n)], rates=(0.0, 0.2))
    assert rows[0]["router"] == rows[0]["random"]
    assert rows[1]["router"]["macro_f1"] > rows[1]["random"]["macro_f1"]
    # The 80 routed pairs are all wrong ones (they are the only unsure ones): each is fixed.
    assert rows[1]["router"]["accuracy"] == pytest.approx(1 - (wrong.sum() - 80) / n)


def test_error_threshold_for_rate_hits_the_rate() -> None:
    probs = np.random.default_rng(1).dirichlet(np.ones(3), 1000)
    policy = RoutingPolicy(rule="expected_error", error_threshold=error_threshold_for_rate(probs, 0.1))
    assert policy.decide(probs, np.zeros(1000)).candidate.mean() == pytest.approx(0.1, abs=0.002)


def test_route_curve_command(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["route-curve", str(tiny_bundle_dir), "--split", "ood_dev", "--rates", "0,0.1", "--repeats", "2"]
    assert main([*args, "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "teacher alone" in out[0] and "expected_error" in out[0]
    assert out[1].split()[:3] == ["route", "rate", "router"]
    assert len(out) == 4 and out[2].split()[0] == "0.0%"


def test_route_curve_rejects_bad_rates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["route-curve", "x", "--rates", "0,1.5"])
    assert "--rates" in capsys.readouterr().err


def test_given_decisions_grade_and_a_routed_pair_can_keep_the_student_s_ranking() -> None:
    """With the node's decisions given, macro-F1 comes from them; with ``llm_ranks`` False the
    ranking (NDCG@10) is the student's at every rate, as for pairs a node routes one by one."""
    from darl_lite.metrics import macro_f1

    rng = np.random.default_rng(3)
    n = 300
    grades = rng.integers(0, 3, n)
    student, teacher = rng.dirichlet(np.ones(3), n), rng.dirichlet(np.ones(3), n)
    student_grades, teacher_grades = rng.integers(0, 3, n), grades.copy()  # decisions unlike argmax
    rows = route_curve(
        student,
        teacher,
        rng.random(n),
        grades,
        [str(i // 15) for i in range(n)],
        rates=(0.0, 0.5, 1.0),
        student_grades=student_grades,
        llm_grades=teacher_grades,
        llm_ranks=False,
    )
    assert rows[0]["router"]["macro_f1"] == pytest.approx(macro_f1(grades, student_grades, 3))
    assert rows[-1]["router"]["macro_f1"] == pytest.approx(1.0)  # every pair takes the true grade
    assert len({r[side]["ndcg@10"] for r in rows for side in ("router", "random")}) == 1
    with pytest.raises(InputError, match="grade decisions"):
        route_curve(student, teacher, rng.random(n), grades, ["q"] * n, student_grades=grades[:-1])


def test_node_route_curve_routes_the_pairs_nearest_their_boundary_and_grades_as_the_node(
    tiny_bundle_dir: Path, splits: Splits
) -> None:
    """On a bundle with per-pair shift routing, the curve's router takes the pairs of smallest
    corrected margin; at rate 0 it grades as the node's corrected student, at rate 1 as the node's
    routed answer; a kind that routes no single pairs is routed last."""
    from darl_lite.metrics import macro_f1
    from darl_lite.scorer import Scorer
    from darl_lite.shift import fit_query_shift
    from darl_lite.shift_routing import ShiftKind, ShiftRouting
    from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

    pairs = [*list(splits.dev)[:150], *list(splits.ood_dev)[:150]]
    queries = [p.query for p in pairs]
    reference = sorted({p.query for p in splits.train})
    detector = fit_query_shift(reference, sorted({p.query for p in splits.ood_train}))
    kind = ShiftKind(
        "questions", detector, 0.5, route_lists=False, route_pairs=False, logit_bias=(0.0, 0.3, 0.6)
    )
    shift = ShiftRouting(
        (kind,), tuple(reference), in_distribution_bias=(0.0, -0.2, 0.4), pair_margin_threshold=0.5
    )
    scorer = Scorer.load(tiny_bundle_dir)
    scored = scorer.score_arrays(queries, [p.item for p in pairs])
    teacher = FileTeacher.from_file(shipped_teacher_path()).predict_proba(pairs)
    grades = np.asarray([p.grade for p in pairs])
    kinds = shift.assign(queries).kind
    assert (kinds == 0).any() and (kinds == -1).any()
    rows = node_route_curve(
        scored.logits,
        scored.ood_scores,
        teacher,
        grades,
        queries,
        temperature=scorer.temperature,
        policy=scorer.routing,
        shift=shift,
        rates=(0.0, 0.1, 1.0),
    )
    served = shift.student_grades(scored.logits, kinds)
    _, answered = shift.fallback_answer(scored.student_probabilities, teacher, kinds)
    assert rows[0]["router"]["macro_f1"] == pytest.approx(macro_f1(grades, served, 3))
    # at rate 1 every pair routes, the kind that routes no single pairs included (it comes last)
    assert rows[-1]["router"]["macro_f1"] == pytest.approx(macro_f1(grades, answered, 3))
    margins = np.sort(shift.decision_logits(scored.logits, kinds), axis=1)
    margins = np.where(kinds == -1, margins[:, -1] - margins[:, -2], np.inf)
    k = round(0.1 * len(pairs))
    routed = np.zeros(len(pairs), bool)
    routed[np.argsort(margins, kind="stable")[:k]] = True
    expected = macro_f1(grades, np.where(routed, answered, served), 3)
    assert rows[1]["router"]["macro_f1"] == pytest.approx(expected)
    assert len({r["router"]["ndcg@10"] for r in rows}) == 1  # one model ranks every list


def test_route_curve_command_follows_the_bundle_s_per_pair_rule(
    tiny_bundle_dir: Path, splits: Splits, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle with a margin threshold is curved by its corrected margin; ``--rule`` names a policy."""
    from darl_lite.bundle import load_bundle
    from darl_lite.cascade_fit import write_with_shift_routing
    from darl_lite.shift_routing import ShiftRouting

    shift = ShiftRouting((), tuple(sorted({p.query for p in splits.train})), pair_margin_threshold=0.5)
    directory = write_with_shift_routing(load_bundle(tiny_bundle_dir), shift, str(tmp_path / "b")).directory
    args = [
        "route-curve",
        str(directory),
        "--split",
        "dev",
        "--rates",
        "0,0.1",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    assert "'corrected margin'" in capsys.readouterr().out.splitlines()[0]
    assert main([*args, "--rule", "expected_error"]) == 0
    assert "'expected_error'" in capsys.readouterr().out.splitlines()[0]


def test_mixed_draws_default_and_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    """The command's default draws are the library's; a stream count below 1 is refused by name."""
    from darl_lite.cli import build_parser
    from darl_lite.mixed_stream import DEFAULT_DRAWS, evaluate_mixed

    assert build_parser().parse_args(["route-curve", "b", "--mixed"]).draws == DEFAULT_DRAWS
    with pytest.raises(InputError, match=r"draws \(--draws\) must be an integer >= 1"):
        evaluate_mixed(None, draws=0, policy=RoutingPolicy(), shift=None)  # type: ignore[arg-type]
