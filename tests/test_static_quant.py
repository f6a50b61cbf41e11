"""Static int8 activation scales (``quantize_int8(mode="static")``, ``ExportConfig.quant_mode``) on
the tiny student from conftest: real export, real onnxruntime, a few seconds each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from darl_lite.calibration import softmax  # noqa: E402
from darl_lite.errors import InputError  # noqa: E402
from darl_lite.export.build import ExportConfig, build_bundle  # noqa: E402
from darl_lite.export.build_steps import BuildContext, calibration_feeds, export_step  # noqa: E402
from darl_lite.export.parity import ParityThresholds  # noqa: E402
from darl_lite.export.quantize import (  # noqa: E402
    _Tails,
    head_nodes,
    quantize_int8,
    static_activation_scales,
)
from darl_lite.types import Pair  # noqa: E402

RELAXED = ParityThresholds(min_argmax_agreement=0.5, min_spearman=0.5, min_ndcg_retention=0.5)


def _small(pairs: tuple[Pair, ...], n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


@pytest.fixture(scope="module")
def ctx(tiny_student_dir: Path, splits: Any, tmp_path_factory: pytest.TempPathFactory) -> BuildContext:
    work = tmp_path_factory.mktemp("static")
    return export_step(tiny_student_dir, work, ExportConfig(max_length=32), _small(splits.dev, 160, 3))


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_static_graph_has_fixed_scales_int8_weights_and_tracks_fp32(
    ctx: BuildContext, splits: Any, tmp_path: Path
) -> None:
    feeds = calibration_feeds(ctx, _small(splits.train, 200, 1))
    target = tmp_path / "static.onnx"
    info = quantize_int8(
        ctx.fp32_path, target, preset="avx512_vnni", exclude_nodes="auto", mode="static", calibration=feeds
    )
    assert (info.mode, info.calibration_pairs, info.activation_percentile) == ("static", 200, 99.99)
    ops = _ops(target)
    assert "DynamicQuantizeLinear" not in ops
    assert ops["QuantizeLinear"] >= 4 and ops["MatMulIntegerToFloat"] >= 4
    graph = onnx.load(str(target)).graph
    initializers = {i.name: i for i in graph.initializer}
    for node in (n for n in graph.node if n.op_type == "MatMulIntegerToFloat"):
        assert initializers[node.input[1]].data_type == onnx.TensorProto.INT8  # int8 weights
    for node in (n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] in initializers):
        assert initializers[node.input[2]].data_type == onnx.TensorProto.UINT8  # fixed u8 activation scale
    assert set(head_nodes(onnx.load(str(ctx.fp32_path)))) <= set(info.excluded_nodes)

    queries, items = ctx.parity_queries, ctx.parity_items
    logits = ctx.load(target).run(queries, items).logits
    agreement = float(np.mean(logits.argmax(1) == ctx.fp32_logits.argmax(1)))
    assert agreement >= 0.9
    assert float(np.max(np.abs(softmax(logits) - softmax(ctx.fp32_logits)))) < 0.15


def test_static_scores_do_not_depend_on_the_rest_of_the_batch(
    ctx: BuildContext, splits: Any, tmp_path: Path
) -> None:
    feeds = calibration_feeds(ctx, _small(splits.train, 200, 1))
    target = tmp_path / "static.onnx"
    quantize_int8(ctx.fp32_path, target, exclude_nodes="auto", mode="static", calibration=feeds)
    model = ctx.load(target)
    queries, items = ctx.parity_queries[:40], ctx.parity_items[:40]
    batched = model.run(queries, items).logits
    alone = np.concatenate([model.run([q], [i]).logits for q, i in zip(queries, items, strict=True)])
    # the dynamic graph of this model moves by ~6e-5 here (per-batch activation scales)
    np.testing.assert_allclose(alone, batched, rtol=0, atol=1e-6)


def test_percentile_tails_match_numpy_on_all_values() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(n) * 3 + 1 for n in (5000, 12000, 777, 30000)]
    everything = np.concatenate(batches)
    for percentile in (99.99, 99.9, 100.0):
        tails = _Tails(len(everything), percentile)
        for batch in batches:
            tails.add(batch)
        low, high = tails.result()
        assert low == pytest.approx(np.percentile(everything, 100 - percentile), rel=1e-12)
        assert high == pytest.approx(np.percentile(everything, percentile), rel=1e-12)
        assert len(tails.high) <= max(3, len(everything) * (100 - percentile) / 100 + 2)


def test_static_mode_needs_calibration_and_a_dynamic_graph(ctx: BuildContext, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="calibration"):
        quantize_int8(ctx.fp32_path, tmp_path / "a.onnx", mode="static")
    with pytest.raises(InputError, match="mode"):
        quantize_int8(ctx.fp32_path, tmp_path / "a.onnx", mode="fast")
    feeds = [{"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}]
    with pytest.raises(InputError, match="not a dynamic int8 graph"):
        static_activation_scales(ctx.fp32_path, feeds)


def test_build_bundle_ships_a_static_graph_when_asked(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    bundle = build_bundle(
        tiny_student_dir,
        tmp_path / "bundle",
        train_pairs=_small(splits.train, 300, 1),
        dev_pairs=_small(splits.dev, 200, 2),
        parity_pairs=_small(splits.dev, 160, 3),
        config=ExportConfig(max_length=32, thresholds=RELAXED, quant_mode="static", calibration_pairs=128),
    )
    q = bundle.manifest["quantization"]
    assert (q["mode"], q["requested_mode"], q["calibration_pairs"]) == ("static", "static", 128)
    assert bundle.manifest["parity"]["passed"]
    ops = _ops(bundle.directory / "model_int8.onnx")
    assert "DynamicQuantizeLinear" not in ops and ops["MatMulIntegerToFloat"] >= 4


def test_a_static_graph_that_fails_the_gate_falls_back_to_the_dynamic_search(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    # an agreement above 1 cannot be met: the static graph fails, the sensitivity search runs and
    # re-quantizes dynamically, and the manifest says which mode shipped
    bundle = build_bundle(
        tiny_student_dir,
        tmp_path / "b",
        train_pairs=_small(splits.train, 200, 1),
        dev_pairs=_small(splits.dev, 120, 2),
        parity_pairs=_small(splits.dev, 80, 3),
        config=ExportConfig(
            max_length=32,
            thresholds=ParityThresholds(1.01, -1.0, 0.0, max_macro_f1_drop=100.0),
            max_sensitive_exclusions=1,
            sensitivity_pairs=40,
            allow_parity_failure=True,
            quant_mode="static",
            calibration_pairs=64,
        ),
    )
    q = bundle.manifest["quantization"]
    assert (q["mode"], q["requested_mode"]) == ("dynamic", "static")
    assert [len(s["excluded_nodes"]) for s in q["exclusion_search"]] == [2, 3]
    assert "DynamicQuantizeLinear" in _ops(bundle.directory / "model_int8.onnx")


def test_auto_quant_mode_follows_the_preset_it_was_measured_on() -> None:
    from darl_lite.errors import InputError
    from darl_lite.export.build_steps import resolve_quant_mode

    assert resolve_quant_mode("auto", "avx512_vnni") == "static"
    assert resolve_quant_mode("auto", "avx2") == "static"
    assert resolve_quant_mode("auto", "arm64") == "dynamic"
    assert resolve_quant_mode("dynamic", "avx512_vnni") == "dynamic"
    assert resolve_quant_mode("static", "avx2") == "static"
    with pytest.raises(InputError, match="quant_mode"):
        resolve_quant_mode("int4", "avx2")
