"""The Scorer on the committed tiny bundle, as a search node runs it: no torch, onnxruntime only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from darl_lite import BundleError, InputError, PairScore, Scorer
from darl_lite.inference import SessionConfig

QUERY = "szechwan food"
ITEMS = ["szechwan dish", "chinese cuisine", "football club", "planet star galaxy", "unknownword"]


def test_score_gives_plain_values_in_input_order(fixture_scorer: Scorer) -> None:
    results = fixture_scorer.score(QUERY, ITEMS)
    assert [type(r) for r in results] == [PairScore] * len(ITEMS)
    for r in results:
        assert all(type(p) is float for p in r.probabilities) and len(r.probabilities) == 3
        assert math.isclose(sum(r.probabilities), 1.0, abs_tol=1e-6)
        assert r.grade == int(np.argmax(r.probabilities)) and type(r.grade) is int
        assert type(r.ood_score) is float and math.isfinite(r.ood_score)
        assert r.source == "student" and not r.truncated
    json.dumps([asdict(r) for r in results])  # plain values: JSON-ready
    one_by_one = [fixture_scorer.score(QUERY, [item])[0] for item in ITEMS]
    for alone, together in zip(one_by_one, results, strict=True):
        np.testing.assert_allclose(alone.probabilities, together.probabilities, atol=2e-3)


def test_score_many_equals_score_per_query(fixture_scorer: Scorer) -> None:
    requests = [(QUERY, ITEMS[:3]), ("football team", []), ("city river", ITEMS[3:])]
    batched = fixture_scorer.score_many(requests)
    assert [len(b) for b in batched] == [3, 0, 2]
    for (query, items), got in zip(requests, batched, strict=True):
        for a, b in zip(got, fixture_scorer.score(query, items), strict=True):
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-3)


def test_fp32_and_int8_agree_on_the_fixture(committed_bundle: Path) -> None:
    fp32 = Scorer.load(committed_bundle, precision="fp32", session=SessionConfig(intra_op_threads=1))
    int8 = Scorer.load(committed_bundle, session=SessionConfig(intra_op_threads=1))
    a, b = fp32.score(QUERY, ITEMS), int8.score(QUERY, ITEMS)
    np.testing.assert_allclose([r.probabilities for r in a], [r.probabilities for r in b], atol=0.02)


def test_long_text_is_truncated_and_odd_text_scored(fixture_scorer: Scorer) -> None:
    long, odd = " ".join(["szechwan"] * 500), "川菜 🌶️ \x00 مطبخ"
    results = fixture_scorer.score(QUERY, [long, odd])
    assert results[0].truncated and not results[1].truncated
    assert fixture_scorer.score(QUERY, []) == []


@pytest.mark.parametrize(
    ("query", "items", "message"),
    [
        ("", ["a"], "query is empty"),
        (QUERY, ["a", 3], r"items\[1\] must be a string, got int"),
        (QUERY, ["a", "  "], r"items\[1\] is empty"),
        (QUERY, "one string", "must be a list of strings"),
        (None, ["a"], "query must be a string, got NoneType"),
    ],
)
def test_bad_input_names_the_field(
    fixture_scorer: Scorer, query: object, items: object, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        fixture_scorer.score(query, items)  # type: ignore[arg-type]


def test_a_tampered_bundle_is_refused(bundle_dir_copy: Path) -> None:
    graph = bundle_dir_copy / "model_int8.onnx"
    original = graph.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model_int8\.onnx .*sha256"):
        Scorer.load(bundle_dir_copy)
    graph.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match="truncated"):
        Scorer.load(bundle_dir_copy)
    graph.write_bytes(original)
    Scorer.load(bundle_dir_copy)  # restored: loads again
    (bundle_dir_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json \(tokenizer\) is missing"):
        Scorer.load(bundle_dir_copy)


def test_scoring_never_imports_torch(committed_bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from darl_lite import Scorer
        import darl_lite.cli, darl_lite.serve
        Scorer.load({str(committed_bundle)!r}).score("szechwan food", ["szechwan dish"])
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "optimum") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
