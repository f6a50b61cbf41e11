"""The bad-input matrix: every odd input gets a defined outcome, a score or a documented error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darl_lite import DarlLiteError, InputError, Scorer
from darl_lite.datasets import load_pairs
from darl_lite.errors import DataError

ODD_BUT_VALID = {
    "emoji": "🍜🌶️ spicy noodles 🔥",
    "right_to_left": "مطبخ سيتشوان الحار",
    "mixed_scripts": "Sichuan 四川 кухня مطبخ",
    "chinese": "四川菜 麻婆豆腐",
    "null_byte": "mapo\x00doufu",
    "control_chars": "mapo\x07\x1b[31m doufu\r\n\t",
    "lone_surrogate": "bad \ud800 surrogate",
    "one_megabyte": "doufu " * 175_000,
}


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    return Scorer.load(tiny_bundle_dir, precision="fp32")


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_text_gets_a_valid_score(scorer: Scorer, name: str) -> None:
    text = ODD_BUT_VALID[name]
    for query, item in ((text, "Mapo doufu"), ("Szechwan cuisine", text)):
        (result,) = scorer.score(query, [item])
        assert math.isclose(sum(result.probabilities), 1.0, abs_tol=1e-6)
        assert all(math.isfinite(p) for p in result.probabilities)
        assert math.isfinite(result.ood_score)
    if name == "one_megabyte":
        assert result.truncated


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([b"bytes are not text"], r"items\[0\] must be a string, got bytes"),
        ([float("nan")], r"items\[0\] must be a string, got float"),
        ([None], r"items\[0\] must be a string, got NoneType"),
        (["ok", "\t\n "], r"items\[1\] is empty or whitespace only"),
        ({"a": 1}, "items must be a list of strings, got dict"),
    ],
)
def test_invalid_items_name_the_field(scorer: Scorer, items: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        scorer.score("q", items)  # type: ignore[arg-type]


def test_many_items_in_one_call_stay_in_order(scorer: Scorer) -> None:
    items = [f"item {i}" for i in range(100_000)]
    results = scorer.score("Szechwan cuisine", items)
    assert len(results) == 100_000
    # Identical texts get identical answers wherever they sit: order is preserved, nothing is mixed.
    again = scorer.score("Szechwan cuisine", [items[99_999], items[0]])
    assert results[99_999].probabilities == pytest.approx(again[0].probabilities, abs=1e-6)
    assert results[0].probabilities == pytest.approx(again[1].probabilities, abs=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=200), items=st.lists(st.text(max_size=200), max_size=5))
def test_arbitrary_unicode_never_raises_an_undocumented_error(
    scorer: Scorer, query: str, items: list[str]
) -> None:
    try:
        results = scorer.score(query, items)
    except InputError:
        assert not query.strip() or any(not item.strip() for item in items)
        return
    assert len(results) == len(items)
    for r in results:
        assert math.isclose(sum(r.probabilities), 1.0, abs_tol=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=5)), min_size=1))
def test_non_text_items_raise_input_error(scorer: Scorer, values: list[object]) -> None:
    with pytest.raises(DarlLiteError):
        scorer.score("q", values)  # type: ignore[arg-type]


def test_nan_grade_in_a_data_file_names_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "query,item,grade\nszechwan,mapo doufu,2\nszechwan,afghan cuisine,nan\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"line 3.*grade"):
        load_pairs(path)
