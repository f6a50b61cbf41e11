"""The GELU-approximation lever of bench/graph_levers.py, built from a real exported bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.graph_levers import GELU_EXACT, GELU_FAST, _session, gelu_variants
from darl_lite.inference import RelevanceModel


def test_the_gelu_variants_differ_by_the_approximation_alone(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    shipped = tiny_bundle_dir / "model_int8.onnx"
    variants = gelu_variants(shipped, tmp_path)

    def ops(path: Path) -> list[str]:
        return [node.op_type for node in onnx.load(str(path)).graph.node]

    exact, fast = ops(variants[GELU_EXACT][0]), ops(variants[GELU_FAST][0])
    assert "Erf" not in exact and exact.count("Gelu") > 0  # onnxruntime fused the exported erf form
    assert fast.count("FastGelu") == exact.count("Gelu") and "Gelu" not in fast
    assert [op for op in fast if op != "FastGelu"] == [op for op in exact if op != "Gelu"]

    helper = RelevanceModel(shipped, tiny_bundle_dir / "tokenizer.json", max_length=32)
    plan = helper.plan(["capital of france"] * 3, ["Paris", "Lyon is a city in France", "a cat"])
    feeds = plan.batches[0][1]
    reference = helper.session.run(["logits"], feeds)[0]
    logits = {name: _session(p, 1, skip).run(["logits"], feeds)[0] for name, (p, skip) in variants.items()}
    np.testing.assert_allclose(logits[GELU_EXACT], reference, rtol=0, atol=1e-5)  # the same maths
    assert not np.array_equal(logits[GELU_FAST], reference)  # the approximation did change something
    np.testing.assert_allclose(logits[GELU_FAST], reference, rtol=0, atol=0.05)  # and only a little


def test_the_first_token_variants_differ_by_the_trim_alone(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    from bench.graph_levers import EVERY_ROW, STATIC_HEAD, build_variants

    tokenizer = tiny_bundle_dir / "tokenizer.json"
    helper = RelevanceModel(tiny_bundle_dir / "model_int8.onnx", tokenizer, max_length=32)
    queries = ["capital of france", "jazz musicians", "szechwan cuisine"] * 4
    items = ["Paris", "Lyon is a city in France", "a cat", "Miles Davis", "mapo doufu", "the sea"] * 2
    calibration = [feeds for _, feeds in helper.plan(queries, items).batches]
    variants = build_variants(tiny_bundle_dir, tmp_path, num_heads=2, calibration=calibration, every_row=True)

    def gathers(path: Path) -> int:
        return sum(n.name.endswith("/first_token_gather") for n in onnx.load(str(path)).graph.node)

    assert gathers(variants[STATIC_HEAD][0]) == 2 and gathers(variants[EVERY_ROW][0]) == 0
    feeds = calibration[0]
    trimmed, full = (_session(variants[k][0], 1).run(["logits"], feeds)[0] for k in (STATIC_HEAD, EVERY_ROW))
    np.testing.assert_array_equal(trimmed, full)  # static scales: the same arithmetic on the kept row
