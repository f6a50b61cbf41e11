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
