"""The parity gate's macro-F1 drop, the per-node sensitivity sweep, and the automatic exclusion of
quantization-sensitive nodes in build_bundle (tiny models, a few seconds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from darl_lite.errors import InputError  # noqa: E402
from darl_lite.export import ParityThresholds, check_parity, parity_report  # noqa: E402
from darl_lite.export.quantize import quantizable_nodes, quantize_int8, sensitivity_sweep  # noqa: E402

# ------------------------------------------------------------------------------------------------
# macro-F1 drop


def test_macro_f1_drop_by_hand() -> None:
    # grades 0, 1, 2, 2; fp32 gets all four right (macro-F1 1.0); int8 calls the last one weak
    fp32 = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
    int8 = fp32.copy()
    int8[3] = [0.0, 3.0, 0.0]
    report = parity_report(fp32, int8, grades=[0, 1, 2, 2], query_ids=["a", "a", "b", "b"])
    # int8: F1(irrelevant) = 1, F1(weak) = 2*1/(1+2) = 2/3, F1(strong) = 2*1/(2+1) = 2/3
    assert report.macro_f1_fp32 == pytest.approx(1.0)
    assert report.macro_f1_int8 == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert report.macro_f1_drop == pytest.approx(100 * (1 - (1 + 4 / 3) / 3))
    failures = check_parity(report, ParityThresholds(0.0, -1.0, 0.0))
    assert len(failures) == 1 and "macro-F1 drop 22.22 points > 0.5" in failures[0]
    assert check_parity(report, ParityThresholds(0.0, -1.0, 0.0, max_macro_f1_drop=25.0)) == []
    assert report.to_dict()["macro_f1_drop"] == pytest.approx(report.macro_f1_drop)


def test_macro_f1_gain_passes_and_no_grades_means_no_check() -> None:
    fp32 = np.array([[0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    int8 = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])  # int8 fixes pair 0
    report = parity_report(fp32, int8, grades=[0, 1, 2], query_ids=["q", "q", "q"])
    assert report.macro_f1_drop is not None and report.macro_f1_drop < 0
    assert not any("macro-F1" in f for f in check_parity(report))
    ungraded = parity_report(fp32, int8)
    assert (ungraded.macro_f1_fp32, ungraded.macro_f1_int8, ungraded.macro_f1_drop) == (None, None, None)
    assert not any("macro-F1" in f for f in check_parity(ungraded))


def test_macro_f1_counts_nonfinite_int8_rows_as_misses() -> None:
    fp32 = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    int8 = fp32.copy()
    int8[1, 0] = np.inf
    report = parity_report(fp32, int8, grades=[0, 1], query_ids=["q", "q"])
    # int8: irrelevant F1 = 1, weak has one true and no answer -> F1 0
    assert report.macro_f1_int8 == pytest.approx(0.5)
    assert report.macro_f1_drop == pytest.approx(50.0)
    with pytest.raises(InputError, match="one grade per pair"):
        parity_report(fp32, fp32, grades=[[0, 1]], query_ids=["q"])


def test_default_thresholds_are_the_issues() -> None:
    t = ParityThresholds()
    assert (t.min_argmax_agreement, t.min_spearman, t.min_ndcg_retention, t.max_macro_f1_drop) == (
        0.99,
        0.99,
        0.99,
        0.5,
    )
    assert t.max_abs_logit_diff is None


# ------------------------------------------------------------------------------------------------
# sensitivity sweep on a hand-made graph


def _three_matmul_graph(path: Path) -> Path:
    """x -> MatMul "a" -> MatMul "b" -> Tanh (pooled) -> MatMul "head" (logits)."""
    rng = np.random.default_rng(0)
    weights = {
        n: rng.normal(size=(8, 8 if n != "w_head" else 3)).astype(np.float32)
        for n in ("w_a", "w_b", "w_head")
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_a"], ["h1"], name="a"),
            helper.make_node("MatMul", ["h1", "w_b"], ["h2"], name="b"),
            helper.make_node("Tanh", ["h2"], ["pooled"], name="act"),
            helper.make_node("MatMul", ["pooled", "w_head"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 8]),
        ],
        initializer=[numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _quantized(path: Path) -> set[str]:
    """Names of the original MatMuls that onnxruntime turned into integer products."""
    return {
        n.name.split("_")[0] if n.name else n.output[0]
        for n in onnx.load(str(path)).graph.node
        if n.op_type in {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    }


def test_sensitivity_sweep_ranks_the_node_that_hurts_first(tmp_path: Path) -> None:
    path = _three_matmul_graph(tmp_path / "g.onnx")
    assert quantizable_nodes(onnx.load(str(path))) == ["a", "b", "head"]
    calls: list[set[str]] = []
    base = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [-1.0, 0.0, 2.0], [1.0, 1.2, 0.0]])

    def logits_of(model_path: Path) -> np.ndarray:
        # a stand-in scorer: quantizing "b" flips grades, quantizing "a" barely moves anything
        quantized = _quantized(model_path)
        calls.append(quantized)
        out = base.copy()
        if "b" in quantized:
            out[:, [0, 2]] = out[:, [2, 0]]
        if "a" in quantized:
            out += 0.01
        return out

    ranking = sensitivity_sweep(path, logits_of, always_excluded=["head"])
    assert calls[0] == set(), "the first call scores the fp32 reference"
    assert calls[1:] == [{"a"}, {"b"}], "each candidate is quantized alone, the head never"
    assert [r.node for r in ranking] == ["b", "a"]
    assert ranking[0].mean_kl > 0.1 and ranking[0].argmax_agreement == 0.5  # rows 0 and 2 flip
    assert ranking[1].mean_kl == pytest.approx(0.0, abs=1e-9) and ranking[1].argmax_agreement == 1.0
    assert sensitivity_sweep(path, logits_of, candidates=[], always_excluded=["head"]) == []
    with pytest.raises(InputError, match="not quantizable"):
        sensitivity_sweep(path, logits_of, candidates=["act"])
    with pytest.raises(InputError, match="same pairs"):
        sensitivity_sweep(path, lambda p: base if not _quantized(p) else base[:2], candidates=["a"])


def test_exclusion_reasons_are_recorded(tmp_path: Path) -> None:
    path = _three_matmul_graph(tmp_path / "g.onnx")
    auto = quantize_int8(path, tmp_path / "auto.onnx", exclude_nodes="auto")
    assert set(auto.exclusion_reasons) == set(auto.excluded_nodes) == {"b", "head"}
    assert all("classifier head" in why for why in auto.exclusion_reasons.values())
    given = quantize_int8(
        path, tmp_path / "given.onnx", exclude_nodes=["a", "head"], reasons={"a": "measured: it hurts"}
    )
    assert given.exclusion_reasons == {"a": "measured: it hurts", "head": "requested by the caller"}
    assert _quantized(Path(given.int8_path)) == {"b"}


def test_an_excluded_embedding_gather_stays_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "table")
    w_head = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w_head")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
            helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w_head"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "s"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 8]),
        ],
        initializer=[table, w_head],
    )
    path = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert quantizable_nodes(onnx.load(str(path))) == ["embed", "head"]
    kept = quantize_int8(path, tmp_path / "kept.onnx", exclude_nodes=["embed"])
    nodes = {n.name: n for n in onnx.load(kept.int8_path).graph.node}
    assert nodes["embed"].op_type == "Gather" and nodes["embed"].input[0] == "table"
    plain = quantize_int8(path, tmp_path / "plain.onnx", exclude_nodes=None)
    plain_inits = {i.name: i.data_type for i in onnx.load(plain.int8_path).graph.initializer}
    assert "table" not in plain_inits or plain_inits["table"] != TensorProto.FLOAT


# ------------------------------------------------------------------------------------------------
# automatic exclusion in build_bundle (tiny student from conftest)


def _small(pairs: tuple[Any, ...], n: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


def test_build_keeps_sensitive_nodes_fp32_when_the_gate_fails(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    from darl_lite.export.build import ExportConfig, build_bundle

    # an agreement above 1 cannot be met: the sweep runs, two sensitive nodes are excluded, the
    # gate still fails and the explicit override writes the bundle and records all of it
    bundle = build_bundle(
        tiny_student_dir,
        tmp_path / "b",
        train_pairs=_small(splits.train, 200, 1),
        dev_pairs=_small(splits.dev, 120, 2),
        parity_pairs=_small(splits.dev, 80, 3),
        config=ExportConfig(
            max_length=32,
            thresholds=ParityThresholds(1.01, -1.0, 0.0, max_macro_f1_drop=100.0),
            max_sensitive_exclusions=2,
            sensitivity_pairs=40,
            allow_parity_failure=True,
        ),
    )
    q = bundle.manifest["quantization"]
    heads = ["/bert/pooler/dense/Gemm", "/classifier/Gemm"]
    assert q["excluded_nodes"][:2] == heads and len(q["excluded_nodes"]) == 4
    sensitive = q["excluded_nodes"][2:]
    assert [s["node"] for s in q["sensitivity"][:2]] == sensitive, "the worst nodes go first"
    kls = [s["mean_kl"] for s in q["sensitivity"]]
    assert kls == sorted(kls, reverse=True) and not set(heads) & {s["node"] for s in q["sensitivity"]}
    assert all("quantization-sensitive" in q["exclusion_reasons"][n] for n in sensitive)
    assert all("classifier head" in q["exclusion_reasons"][n] for n in heads)
    steps = q["exclusion_search"]
    assert [len(s["excluded_nodes"]) for s in steps] == [2, 3, 4]
    assert not any(s["passed"] for s in steps)
    assert bundle.manifest["parity"]["overridden"] is True
    assert math.isfinite(bundle.manifest["parity"]["macro_f1_drop"])


def test_build_runs_no_sweep_when_the_gate_passes(tiny_bundle_dir: Path) -> None:
    import json

    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["parity"]["passed"] is True
    assert len(q["exclusion_search"]) == 1 and q["exclusion_search"][0]["passed"] is True
    assert q["sensitivity"] == [] and set(q["exclusion_reasons"]) == set(q["excluded_nodes"])
    assert "macro_f1_drop" in manifest["parity"] and "max_macro_f1_drop" in manifest["parity"]["thresholds"]
