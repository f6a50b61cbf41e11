"""The distribution-aware cascade end to end: a real bundle with shift routing, the scorer, the
refit command and the mixed-traffic evaluation, on shipped pairs and the shipped teacher file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from darl_lite.bundle import load_bundle
from darl_lite.cascade_fit import write_with_shift_routing
from darl_lite.cli import main
from darl_lite.datasets import Splits
from darl_lite.errors import BundleError, InputError
from darl_lite.llm.adapters import teacher_fallback
from darl_lite.mixed_stream import CONTENDERS, mixed_report
from darl_lite.refit import refit_routing
from darl_lite.scorer import Scorer
from darl_lite.shift import fit_query_shift
from darl_lite.shift_routing import ROLE_SHIFT, ShiftKind, ShiftRouting
from darl_lite.teacher_file import FileTeacher, shipped_teacher_path


@pytest.fixture(scope="module")
def teacher() -> FileTeacher:
    return FileTeacher.from_file(shipped_teacher_path())


@pytest.fixture()
def fresh_shift_bundle(tiny_bundle_dir: Path, splits: Splits, tmp_path: Path) -> Path:
    reference = sorted({p.query for p in splits.train})
    detector = fit_query_shift(reference, sorted({p.query for p in splits.ood_train}))
    kind = ShiftKind(
        "questions", detector, 0.5, route_lists=True, route_pairs=False, logit_bias=(0.0, 0.5, 0.0)
    )
    shift = ShiftRouting((kind,), tuple(reference), list_reserve_pairs=0)
    return write_with_shift_routing(load_bundle(tiny_bundle_dir), shift, str(tmp_path / "b")).directory


def _per_query(pairs: object, n: int) -> list:
    """At most ``n`` pairs of every query, so a few hundred pairs span many queries."""
    seen: dict[str, int] = {}
    out = []
    for p in pairs:  # type: ignore[attr-defined]
        if seen.get(p.query, 0) < n:
            seen[p.query] = seen.get(p.query, 0) + 1
            out.append(p)
    return out


def _query_pairs(splits: Splits, name: str, n: int = 6) -> tuple[str, list[str]]:
    pairs = list(splits.split(name))
    query = pairs[0].query
    return query, [p.item for p in pairs if p.query == query][:n]


def test_bundle_carries_the_shift_routing_hashed(fresh_shift_bundle: Path) -> None:
    bundle = load_bundle(fresh_shift_bundle)
    assert ROLE_SHIFT in bundle.manifest["files"]
    assert bundle.manifest["routing"]["shift"][0]["route_lists"] is True
    path = bundle.path_of(ROLE_SHIFT)
    path.write_text(path.read_text().replace('"route_lists": true', '"route_lists": false'))
    with pytest.raises(BundleError, match="shift_routing"):
        load_bundle(fresh_shift_bundle)


def test_shifted_query_is_graded_by_the_teacher_as_a_whole_list(
    fresh_shift_bundle: Path, splits: Splits, teacher: FileTeacher
) -> None:
    scorer = Scorer.load(fresh_shift_bundle, fallback=teacher_fallback(teacher))
    query, items = _query_pairs(splits, "ood_test")
    results = scorer.score(query, items)
    assert all(r.source == "llm" and r.routed for r in results)
    assert all(r.query_shift > 0.5 for r in results)
    from darl_lite.types import Pair

    expected = teacher.predict_proba([Pair(query, i) for i in items])
    np.testing.assert_allclose([r.probabilities for r in results], expected, atol=1e-6)
    keyword, its = _query_pairs(splits, "id_test")
    plain = scorer.score(keyword, its)
    assert all(r.query_shift < 0.5 for r in plain)
    assert not all(r.source == "llm" for r in plain)  # per-pair routing only, under its cap


def test_window_budget_keeps_shifted_list_whole_or_on_the_student(
    fresh_shift_bundle: Path, splits: Splits, teacher: FileTeacher
) -> None:
    from darl_lite.budget import RouteBudget
    from darl_lite.cascade import NOTE_LIST_BUDGET

    budget = RouteBudget(0.1, window_s=1e9, clock=lambda: 0.0)
    scorer = Scorer.load(fresh_shift_bundle, fallback=teacher_fallback(teacher), budget=budget)
    query, items = _query_pairs(splits, "ood_test")
    first = scorer.score(query, items)
    assert all(r.source == "student" and r.note == NOTE_LIST_BUDGET for r in first)


def test_refit_routing_writes_a_new_bundle_from_user_pairs(
    fresh_shift_bundle: Path, splits: Splits, teacher: FileTeacher, tmp_path: Path
) -> None:
    pairs = _per_query(splits.ood_dev, 25)
    report = refit_routing(fresh_shift_bundle, pairs, teacher.predict_proba(pairs), tmp_path / "refit")
    bundle = load_bundle(report.bundle_dir)
    names = [k["name"] for k in bundle.manifest["routing"]["shift"]]
    assert names == ["questions", "user traffic"]
    assert report.kind["evidence"]["pairs"] > 0 and report.curve[0]["route_rate"] == 0.0
    assert isinstance(report.kind["route_lists"], bool)
    with pytest.raises(InputError, match="distinct queries"):
        few = [p for p in pairs if p.query == pairs[0].query]
        refit_routing(fresh_shift_bundle, few, teacher.predict_proba(few), tmp_path / "x")


def test_refit_needs_a_bundle_with_reference_queries(
    tiny_bundle_dir: Path, splits: Splits, teacher: FileTeacher, tmp_path: Path
) -> None:
    pairs = _per_query(splits.ood_dev, 20)
    with pytest.raises(BundleError, match="re-export"):
        refit_routing(tiny_bundle_dir, pairs, teacher.predict_proba(pairs), tmp_path / "r")


def test_mixed_report_compares_every_contender(
    fresh_shift_bundle: Path, splits: Splits, teacher: FileTeacher
) -> None:
    scorer = Scorer.load(fresh_shift_bundle)
    id_pairs = [p for p in splits.dev][:600]
    shifted = [p for p in splits.ood_dev][:600]
    report = mixed_report(
        scorer,
        id_pairs,
        shifted,
        teacher.predict_proba(id_pairs),
        teacher.predict_proba(shifted),
        shares=(0.3, 1.0),
        budgets=(0.5,),
        draws=2,
    )
    assert report["detection"]["query_auroc_domain"] >= 0.9
    row = report["streams"][0]
    assert set(row["contenders"]) == set(CONTENDERS)
    cascade = row["contenders"]["cascade"]
    assert cascade["shifted_queries_listed"]["mean"] > 0  # half the stream's pairs may go: lists do
    # the paired difference to random routing, draw by draw, on the same streams
    assert row["contenders"]["random"]["f1_vs_random"] == {
        "mean": 0.0,
        "min": 0.0,
        "max": 0.0,
        "ci90": [0.0, 0.0],
        "draws_above": 0,
    }
    vs = cascade["f1_vs_random"]
    assert vs["min"] <= vs["ci90"][0] <= vs["mean"] <= vs["ci90"][1] <= vs["max"]
    assert 0 <= vs["draws_above"] <= 2
    gap = cascade["overall"]["macro_f1"]["mean"] - row["contenders"]["random"]["overall"]["macro_f1"]["mean"]
    assert vs["mean"] == pytest.approx(gap, abs=1e-12)
    teacher_row = report["streams"][1]["contenders"]["teacher"]
    assert teacher_row["route_rate"]["mean"] == 1.0


def test_route_curve_mixed_and_refit_cli(
    fresh_shift_bundle: Path,
    splits: Splits,
    teacher: FileTeacher,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(
        [
            "route-curve",
            str(fresh_shift_bundle),
            "--mixed",
            "--mixed-splits",
            "dev,ood_dev",
            "--draws",
            "1",
            "--shares",
            "0.3",
            "--budgets",
            "0.1",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"] == ["dev", "ood_dev"] and out["streams"][0]["budget"] == 0.1
    pairs = _per_query(splits.ood_dev, 20)
    pairs_file = tmp_path / "mine.jsonl"
    pairs_file.write_text(
        "".join(json.dumps({"query": p.query, "item": p.item, "grade": p.grade}) + "\n" for p in pairs)
    )
    from darl_lite.teacher_file import write_teacher_outputs

    teacher_file = write_teacher_outputs(
        tmp_path / "t.jsonl", pairs, teacher.predict_proba(pairs), {"name": "t"}
    )
    rc = main(
        [
            "refit-routing",
            str(fresh_shift_bundle),
            "--pairs",
            str(pairs_file),
            "--teacher",
            str(teacher_file),
            "--out",
            str(tmp_path / "new"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "user traffic" in text and "route rate" in text
    assert (tmp_path / "new" / "manifest.json").is_file()


def test_routed_lists_take_the_teacher_s_corrected_grades(
    tiny_bundle_dir: Path, splits: Splits, teacher: FileTeacher, tmp_path: Path
) -> None:
    """A routed pair's grade is the teacher's argmax after its population's fallback correction."""
    from darl_lite.types import Pair

    reference = sorted({p.query for p in splits.train})
    detector = fit_query_shift(reference, sorted({p.query for p in splits.ood_train}))
    bias = (0.0, 0.0, 4.0)  # large enough to move every grade to "strong"
    kind = ShiftKind("questions", detector, 0.5, route_lists=True, route_pairs=False, fallback_bias=bias)
    shift = ShiftRouting((kind,), tuple(reference), list_reserve_pairs=0)
    directory = write_with_shift_routing(load_bundle(tiny_bundle_dir), shift, str(tmp_path / "b")).directory
    scorer = Scorer.load(directory, fallback=teacher_fallback(teacher))
    query, items = _query_pairs(splits, "ood_test")
    results = scorer.score(query, items)
    probs = np.asarray(teacher.predict_proba([Pair(query, i) for i in items]))
    expected = (np.log(np.clip(probs, 1e-12, None)) + np.asarray(bias)).argmax(1)
    assert all(r.source == "llm" for r in results)
    assert [r.grade for r in results] == expected.tolist()
    assert [r.grade for r in results] != probs.argmax(1).tolist()  # the correction moved grades
    np.testing.assert_allclose([r.probabilities for r in results], probs, atol=1e-6)  # not the ranking


def test_routed_pairs_are_answered_by_the_bundle_s_blend_of_teacher_and_student(
    tiny_bundle_dir: Path, splits: Splits, teacher: FileTeacher, tmp_path: Path
) -> None:
    """With ``teacher_weight`` w, a routed pair's probabilities are w·teacher + (1 − w)·student,
    and the weight survives the bundle's shift routing file."""
    from darl_lite.types import Pair

    reference = sorted({p.query for p in splits.train})
    detector = fit_query_shift(reference, sorted({p.query for p in splits.ood_train}))
    kind = ShiftKind("questions", detector, 0.5, route_lists=True, route_pairs=False)
    shift = ShiftRouting((kind,), tuple(reference), list_reserve_pairs=0, teacher_weight=0.5)
    directory = write_with_shift_routing(load_bundle(tiny_bundle_dir), shift, str(tmp_path / "b")).directory
    scorer = Scorer.load(directory, fallback=teacher_fallback(teacher))
    assert scorer.shift is not None and scorer.shift.teacher_weight == 0.5
    assert load_bundle(directory).manifest["routing"]["teacher_weight"] == 0.5
    query, items = _query_pairs(splits, "ood_test")
    arrays = scorer.score_arrays([query] * len(items), items)
    probs = np.asarray(teacher.predict_proba([Pair(query, i) for i in items]))
    assert arrays.from_llm.all()
    expected = 0.5 * probs + 0.5 * arrays.student_probabilities
    np.testing.assert_allclose(arrays.probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(arrays.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert arrays.grades is not None
    assert arrays.grades.tolist() == expected.argmax(1).tolist()  # no fallback correction here


def test_a_warm_budget_window_routes_lists_a_cold_one_cannot(
    fresh_shift_bundle: Path, splits: Splits, teacher: FileTeacher
) -> None:
    """A node that just started has no allowance for a whole list; after serving the same traffic
    for a while (the warm-up draw) it has, and answers are measured on the stream only."""
    scorer = Scorer.load(fresh_shift_bundle)
    id_pairs = list(splits.dev)[:900]
    shifted = _per_query(splits.ood_dev, 30)
    report = mixed_report(
        scorer,
        id_pairs,
        shifted,
        teacher.predict_proba(id_pairs),
        teacher.predict_proba(shifted),
        shares=(0.1,),
        budgets=(0.1,),
        draws=3,
        cold_start_too=True,
    )
    warm, cold = report["streams"][0], report["streams_cold_start"][0]
    assert warm["warm_up"] is True and cold["warm_up"] is False
    listed = {
        name: row["contenders"]["cascade"]["shifted_queries_listed"]["mean"]
        for name, row in (("warm", warm), ("cold", cold))
    }
    assert listed["warm"] > listed["cold"]
    # the student's answers do not depend on the budget window
    assert warm["contenders"]["student"]["overall"] == cold["contenders"]["student"]["overall"]


def test_a_lone_routed_pair_takes_the_teacher_s_grade_and_its_list_keeps_the_student_s_ranking(
    tiny_bundle_dir: Path, splits: Splits, teacher: FileTeacher, tmp_path: Path
) -> None:
    """Per-pair routing answers the grade; only a routed list head is ranked by the blend, so a list
    is never ranked by two models' scales. A shifted list sends its head of ``list_top_k`` pairs."""
    from darl_lite.routing import RoutingPolicy
    from darl_lite.types import Pair

    reference = sorted({p.query for p in splits.train})
    detector = fit_query_shift(reference, sorted({p.query for p in splits.ood_train}))
    kind = ShiftKind("questions", detector, 0.5, route_lists=True, route_pairs=False, list_top_k=3)
    # a margin threshold no pair reaches: every in-distribution pair is a per-pair candidate
    shift = ShiftRouting(
        (kind,), tuple(reference), list_reserve_pairs=0, teacher_weight=0.5, pair_margin_threshold=1e3
    )
    directory = write_with_shift_routing(load_bundle(tiny_bundle_dir), shift, str(tmp_path / "b")).directory
    assert load_bundle(directory).manifest["routing"]["shift"][0]["list_top_k"] == 3
    scorer = Scorer.load(
        directory, fallback=teacher_fallback(teacher), routing=RoutingPolicy(max_route_fraction=1.0)
    )

    keyword, its = _query_pairs(splits, "id_test")
    alone = scorer.score_arrays([keyword] * len(its), its)
    probs = np.asarray(teacher.predict_proba([Pair(keyword, i) for i in its]))
    assert alone.list_routed is not None and alone.grades is not None
    assert alone.from_llm.all() and not alone.list_routed.any()
    np.testing.assert_array_equal(alone.probabilities, alone.student_probabilities)  # the ranking
    blend = 0.5 * probs + 0.5 * alone.student_probabilities
    assert alone.grades.tolist() == blend.argmax(1).tolist()  # the grade: the routed answer's

    query, items = _query_pairs(splits, "ood_test")
    listed = scorer.score_arrays([query] * len(items), items)
    assert listed.list_routed is not None
    head = np.argsort(-(listed.student_probabilities @ np.asarray(scorer.gains)), kind="stable")[:3]
    assert np.flatnonzero(listed.list_routed).tolist() == sorted(head.tolist())
    probs = np.asarray(teacher.predict_proba([Pair(query, i) for i in items]))
    expected = np.where(
        listed.list_routed[:, None],
        0.5 * probs + 0.5 * listed.student_probabilities,
        listed.student_probabilities,
    )
    np.testing.assert_allclose(listed.probabilities, expected, atol=1e-6)
    assert listed.from_llm.sum() == 3  # the tail stays with the student: route_pairs is off there
