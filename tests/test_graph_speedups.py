"""The export's graph speed-ups keep the answers: attention fusion, the OOD score as graph nodes,
and the runtime's session without onnxruntime's SkipLayerNormalization rewrite (tiny real models)."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from darl_lite import Scorer, SessionConfig
from darl_lite.bundle import load_bundle, model_role, ood_role
from darl_lite.datasets import Splits
from darl_lite.errors import InputError
from darl_lite.export.fuse import FUSION_SWITCHES, fuse_attention
from darl_lite.export.ood_graph import append_ood_distance
from darl_lite.export.quantize import quantizable_nodes, quantize_int8
from darl_lite.inference import OOD_OUTPUT, RelevanceModel
from darl_lite.ood import MahalanobisDetector


def _op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _pairs(splits: Splits, n: int) -> tuple[list[str], list[str]]:
    pairs = list(splits.ood_test[:n])
    return [p.query for p in pairs], [p.item for p in pairs]


@pytest.fixture(scope="module")
def manifest(tiny_bundle_dir: Path) -> dict:
    return json.loads((tiny_bundle_dir / "manifest.json").read_text())


def test_the_exported_int8_graph_runs_fused_quantized_attention(
    tiny_bundle_dir: Path, manifest: dict
) -> None:
    fusion = manifest["model"]["fusion"]
    assert fusion["applied"] is True
    assert fusion["fused_ops"]["Attention"] == 2  # one per layer of the 2-layer student
    assert fusion["switches"] == FUSION_SWITCHES
    assert fusion["max_abs_diff_logits"] <= 1e-3
    ops = _op_counts(tiny_bundle_dir / "model_int8.onnx")
    assert ops["QAttention"] == 2
    assert ops["SkipLayerNormalization"] == 0 and ops["BiasGelu"] == 0
    # the fp32 graph stays the unfused reference the parity gate compares against
    assert _op_counts(tiny_bundle_dir / "model_fp32.onnx")["Attention"] == 0


def test_fused_fp32_graph_answers_as_the_unfused_one(
    tiny_bundle_dir: Path, tiny_student_dir: Path, splits: Splits, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from darl_lite.export.onnx_export import export_onnx

    model = AutoModelForSequenceClassification.from_pretrained(tiny_student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_student_dir)
    plain = tmp_path / "plain.onnx"
    export_onnx(model, tokenizer, plain)
    fused = tmp_path / "fused.onnx"
    info = fuse_attention(plain, fused, model_type="bert", num_heads=2, hidden_size=32)
    assert info.applied and _op_counts(fused)["Attention"] == 2
    tok = tiny_bundle_dir / "tokenizer.json"
    queries, items = _pairs(splits, 300)
    a = RelevanceModel(plain, tok, max_length=32).run(queries, items)
    b = RelevanceModel(fused, tok, max_length=32).run(queries, items)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    np.testing.assert_allclose(b.pooled, a.pooled, atol=1e-4)
    # the fused graph is quantizable, its Attention included (as QAttention)
    assert any(name for name in quantizable_nodes(onnx.load(str(fused))) if "Attention" in name)
    int8 = tmp_path / "int8.onnx"
    quantize_int8(fused, int8, preset="avx512_vnni", exclude_nodes="auto")
    assert _op_counts(int8)["QAttention"] == 2


def test_fusion_leaves_an_unknown_architecture_alone(tmp_path: Path) -> None:
    info = fuse_attention(
        tmp_path / "x.onnx", tmp_path / "y.onnx", model_type="qwen2", num_heads=2, hidden_size=8
    )
    assert not info.applied and "qwen2" in info.reason
    assert not (tmp_path / "y.onnx").exists()


def test_the_graph_ood_output_is_the_numpy_detector(
    tiny_bundle_dir: Path, manifest: dict, splits: Splits
) -> None:
    assert manifest["model"]["outputs"]["ood"] == OOD_OUTPUT
    bundle = load_bundle(tiny_bundle_dir)
    queries, items = _pairs(splits, 200)
    for precision in ("int8", "fp32"):
        assert manifest["ood"]["in_graph"]["max_rel_diff_vs_numpy"][precision] <= 1e-4
        model = RelevanceModel(
            bundle.path_of(model_role(precision)), bundle.path_of("tokenizer"), max_length=32
        )
        assert model.has_ood_output
        out = model.run(queries, items)
        assert out.ood is not None and out.ood.shape == (200,)
        numpy_scores = MahalanobisDetector.load(bundle.path_of(ood_role(precision))).score(out.pooled)
        np.testing.assert_allclose(out.ood, numpy_scores, rtol=1e-4)
    # the scorer reports the graph's score, in input order
    scorer = Scorer.load(tiny_bundle_dir)
    arrays = scorer.score_arrays(queries, items)
    model_out = scorer.model.run(queries, items)
    np.testing.assert_allclose(arrays.ood_scores, scorer.detector.score(model_out.pooled), rtol=1e-4)


def test_a_graph_without_the_ood_output_falls_back_to_numpy(
    tiny_bundle_dir: Path, splits: Splits, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    queries, items = _pairs(splits, 50)
    graph = onnx.load(str(bundle.path_of(model_role("int8"))))
    del graph.graph.output[2]  # an older bundle's graph: logits and pooled only
    older = tmp_path / "older.onnx"
    onnx.save(graph, str(older))
    model = RelevanceModel(older, bundle.path_of("tokenizer"), max_length=32)
    assert not model.has_ood_output
    out = model.run(queries, items)
    assert out.ood is None
    scorer = Scorer.load(tiny_bundle_dir)
    scorer.model = model
    detector_scores = scorer.detector.score(out.pooled)
    np.testing.assert_allclose(scorer.score_arrays(queries, items).ood_scores, detector_scores, rtol=1e-6)
    np.testing.assert_allclose(
        Scorer.load(tiny_bundle_dir).score_arrays(queries, items).ood_scores, detector_scores, rtol=1e-4
    )


def test_appending_ood_nodes_twice_or_to_the_wrong_width_is_refused(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    copy = tmp_path / "m.onnx"
    shutil.copy(bundle.path_of(model_role("int8")), copy)
    detector = MahalanobisDetector.load(bundle.path_of(ood_role("int8")))
    with pytest.raises(InputError, match="already has an output"):
        append_ood_distance(copy, detector)
    wide = MahalanobisDetector(means=np.zeros((3, 7)), precision=np.eye(7))
    with pytest.raises(InputError, match="has no output 'nope'"):
        append_ood_distance(copy, wide, pooled_name="nope")


def test_the_runtime_session_skips_the_slow_skip_layer_norm_rewrite(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    graph = load_bundle(tiny_bundle_dir).path_of(model_role("int8"))  # Add + LayerNormalization pairs
    default, everything = tmp_path / "default.onnx", tmp_path / "all.onnx"
    SessionConfig(intra_op_threads=1).create_session(graph, optimized_model_path=default)
    SessionConfig(intra_op_threads=1, disabled_optimizers=()).create_session(
        graph, optimized_model_path=everything
    )
    assert _op_counts(everything)["SkipLayerNormalization"] > 0  # onnxruntime would fuse them
    assert _op_counts(default)["SkipLayerNormalization"] == 0  # the runtime's default does not
    with pytest.raises(InputError, match="tuple of optimizer names"):
        SessionConfig(disabled_optimizers="SkipLayerNormFusion").create_session(graph)  # type: ignore[arg-type]


def test_export_without_fusion_quantizes_the_plain_graph(
    tiny_student_dir: Path, splits: Splits, tmp_path: Path
) -> None:
    from darl_lite.export.build import ExportConfig, build_bundle
    from darl_lite.export.parity import ParityThresholds

    bundle = build_bundle(
        tiny_student_dir,
        tmp_path / "plain",
        train_pairs=list(splits.train[:300]),
        dev_pairs=list(splits.dev[:200]),
        parity_pairs=list(splits.dev[200:400]),
        config=ExportConfig(
            max_length=32,
            fuse_attention=False,
            quant_mode="dynamic",  # the dynamic kernels' names are asserted below
            thresholds=ParityThresholds(min_argmax_agreement=0.5, min_spearman=0.5, min_ndcg_retention=0.5),
        ),
    )
    fusion = bundle.manifest["model"]["fusion"]
    assert fusion["applied"] is False and "fuse_attention=False" in fusion["reason"]
    ops = _op_counts(bundle.path_of(model_role("int8")))
    assert ops["QAttention"] == 0 and ops["Attention"] == 0
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
    # the OOD output is written whether or not attention is fused
    assert RelevanceModel(
        bundle.path_of(model_role("int8")), bundle.path_of("tokenizer"), max_length=32
    ).has_ood_output
