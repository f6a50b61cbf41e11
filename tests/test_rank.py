"""The ranking API beside score(): rank(), predict(), typed load() options, the OOD percentile."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from darl_lite import InputError, Scorer, SessionConfig
from darl_lite.datasets import Splits
from darl_lite.errors import BundleError
from darl_lite.ood_scale import OODScale, id_quantile_table
from darl_lite.ranking import RankedItem

QUERY = "Szechwan cuisine"
ITEMS = ["Mapo doufu", "Afghan cuisine", "Kung Pao chicken", "Mapo doufu", "Sichuan pepper", "Jazz"]


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    return Scorer.load(tiny_bundle_dir, precision="fp32", session=SessionConfig(intra_op_threads=1))


def test_rank_is_score_sorted_with_input_indices(scorer: Scorer) -> None:
    scores = scorer.score(QUERY, ITEMS)
    ranked = scorer.rank(QUERY, ITEMS)
    expected = sorted(range(len(ITEMS)), key=lambda i: (-scores[i].expected_relevance, i))
    assert [r.index for r in ranked] == expected
    assert [r.score for r in ranked] == [scores[i] for i in expected]
    # A duplicate item ties with itself: input order decides (0 before 3).
    assert [r.index for r in ranked if ITEMS[r.index] == "Mapo doufu"] == [0, 3]
    values = [r.expected_relevance for r in ranked]
    assert values == sorted(values, reverse=True)
    top = max(scorer.bundle.grade_gains)
    for r in ranked:
        assert r.item is None
        assert r.relevance_score == pytest.approx(r.expected_relevance / top)
        assert 0.0 <= r.relevance_score <= 1.0


def test_rank_top_k_and_return_items(scorer: Scorer) -> None:
    full = scorer.rank(QUERY, ITEMS)
    top2 = scorer.rank(QUERY, ITEMS, top_k=2, return_items=True)
    assert [r.index for r in top2] == [r.index for r in full[:2]]
    assert [r.item for r in top2] == [ITEMS[r.index] for r in top2]
    assert len(scorer.rank(QUERY, ITEMS, top_k=100)) == len(ITEMS)
    assert scorer.rank(QUERY, []) == []
    assert isinstance(full[0], RankedItem)


@pytest.mark.parametrize(
    ("top_k", "message"),
    [(0, "top_k must be >= 1"), (-1, "top_k must be >= 1"), (1.5, "got float"), (True, "got bool")],
)
def test_rank_refuses_a_bad_top_k(scorer: Scorer, top_k: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        scorer.rank(QUERY, ITEMS, top_k=top_k)  # type: ignore[arg-type]


def test_rank_validates_like_score(scorer: Scorer) -> None:
    with pytest.raises(InputError, match=r"items\[1\] is empty"):
        scorer.rank(QUERY, ["a", " "])
    with pytest.raises(InputError, match="query must be a string"):
        scorer.rank(None, ["a"])  # type: ignore[arg-type]


def test_arank_equals_rank(scorer: Scorer) -> None:
    import asyncio

    assert asyncio.run(scorer.arank(QUERY, ITEMS, top_k=3)) == scorer.rank(QUERY, ITEMS, top_k=3)


def test_predict_grades_mixed_pairs_as_score_does(scorer: Scorer) -> None:
    pairs = [(QUERY, "Mapo doufu"), ("films by Akira Kurosawa", "Rashomon"), (QUERY, "Jazz")]
    got = scorer.predict(pairs)
    assert len(got) == 3
    for (query, item), result in zip(pairs, got, strict=True):
        (alone,) = scorer.score(query, [item])
        np.testing.assert_allclose(result.probabilities, alone.probabilities, atol=1e-6)
        assert result.grade == alone.grade
    assert scorer.predict([]) == []
    assert scorer.predict([["q", "item as a list pair"]]) != []  # type: ignore[list-item]  # any 2-sequence


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ("q", r"pairs must be a list of \(query, item\) tuples, got str"),
        (None, "got NoneType"),
        ([("q", "a"), ("q",)], r"pairs\[1\] must be a \(query, item\) tuple, got tuple"),
        ([("q", "a"), "qa"], r"pairs\[1\] must be a \(query, item\) tuple, got str"),
        ([("q", "a", "b")], r"pairs\[0\] must be a \(query, item\) tuple"),
        ([(" ", "a")], r"pairs\[0\]\.query is empty or whitespace only"),
        ([("q", "a"), ("q", 5)], r"pairs\[1\]\.item must be a string, got int"),
        ([("q", None)], r"pairs\[0\]\.item must be a string, got NoneType"),
        ([(b"q", "a")], r"pairs\[0\]\.query must be a string, got bytes"),
    ],
)
def test_predict_names_the_bad_pair(scorer: Scorer, pairs: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        scorer.predict(pairs)  # type: ignore[arg-type]


def test_load_takes_explicit_typed_options(tiny_bundle_dir: Path) -> None:
    parameters = inspect.signature(Scorer.load).parameters
    options = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    constructor = inspect.signature(Scorer.__init__).parameters
    assert options == [n for n, p in constructor.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert all(parameters[n].default == constructor[n].default for n in options)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    with pytest.raises(TypeError, match="precison"):
        Scorer.load(tiny_bundle_dir, precison="fp32")  # type: ignore[call-arg]
    scorer = Scorer.load(tiny_bundle_dir, precision="fp32", batch_size=2)
    assert scorer.precision == "fp32" and scorer.model.batch_size == 2


# --------------------------------------------------------------------------------------------------
# OOD percentile


def test_the_scale_maps_scores_to_the_share_below_by_hand() -> None:
    scale = OODScale([10.0, 20.0, 30.0])  # levels 0, 0.5, 1
    np.testing.assert_allclose(scale.percentiles(np.array([5.0, 10.0, 15.0, 20.0, 30.0, 99.0])),
                               [0.0, 0.0, 0.25, 0.5, 1.0, 1.0])  # fmt: skip
    flat = OODScale([1.0, 1.0, 1.0, 2.0])  # levels 0, 1/3, 2/3, 1: a run of ties
    assert flat.percentiles(np.array([1.0]))[0] == pytest.approx(2 / 3)
    np.testing.assert_allclose(id_quantile_table(np.arange(101.0)), np.arange(101.0), atol=1e-9)
    with pytest.raises(BundleError, match="sorted"):
        OODScale([2.0, 1.0])
    with pytest.raises(BundleError, match=">= 2 finite"):
        OODScale([1.0, float("nan")])


def _with_table(bundle_dir: Path, table: list[float] | None) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["ood"].pop("id_quantiles", None)
    if table is not None:
        manifest["ood"]["id_quantiles"] = {"fp32": table}
    path.write_text(json.dumps(manifest))  # the manifest itself carries no hash


def test_a_bundle_without_the_table_gives_none(bundle_copy: Path) -> None:
    _with_table(bundle_copy, None)
    scorer = Scorer.load(bundle_copy, precision="fp32")
    assert all(r.ood_percentile is None for r in scorer.score(QUERY, ITEMS))


def test_the_percentile_is_the_share_of_dev_pairs_scoring_lower(bundle_copy: Path, splits: Splits) -> None:
    dev = list(splits.dev)[:400]
    plain = Scorer.load(bundle_copy, precision="fp32", session=SessionConfig(intra_op_threads=1))
    dev_scores = plain.score_arrays([p.query for p in dev], [p.item for p in dev]).ood_scores
    _with_table(bundle_copy, id_quantile_table(dev_scores))
    scorer = Scorer.load(bundle_copy, precision="fp32", session=SessionConfig(intra_op_threads=1))
    results = scorer.predict([(p.query, p.item) for p in dev])
    got = np.array([r.ood_percentile for r in results])
    raw = np.array([r.ood_score for r in results])
    share_lower = np.array([(dev_scores < s).mean() for s in raw])
    assert np.max(np.abs(got - share_lower)) <= 0.011  # a 101-point table: within a percentile
    order = np.argsort(raw)
    assert np.all(np.diff(got[order]) >= 0)  # monotone in the raw score


def test_the_export_writes_the_quantile_table(tiny_bundle_dir: Path) -> None:
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    tables = manifest["ood"]["id_quantiles"]
    assert set(tables) == {"int8", "fp32"}
    for table in tables.values():
        assert len(table) == 101 and table == sorted(table)
    for precision in ("int8", "fp32"):
        results = Scorer.load(tiny_bundle_dir, precision=precision).score(QUERY, ITEMS)
        assert all(r.ood_percentile is not None and 0.0 <= r.ood_percentile <= 1.0 for r in results)
