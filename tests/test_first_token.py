"""The last layer after its attention runs on the first token only, and the answers stay the same
(``darl_lite.export.first_token``): on the tiny student's real graphs (fp32, static and dynamic
int8) and on small hand-built graphs where the pass must stop."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from darl_lite.export.build import ExportConfig
from darl_lite.export.build_steps import calibration_feeds, export_step, first_token_step
from darl_lite.export.first_token import trim_to_first_token
from darl_lite.export.quantize import quantize_int8
from darl_lite.inference import RelevanceModel
from darl_lite.types import Pair


def _ops(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _small(pairs: tuple[Pair, ...], n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


def _outputs(path: Path, tokenizer: Path, pairs: list[Pair]) -> Any:
    model = RelevanceModel(path, tokenizer, max_length=32)
    return model.run([p.query for p in pairs], [p.item for p in pairs])


def test_the_exported_int8_graph_runs_its_last_layer_on_the_first_token(tiny_bundle_dir: Path) -> None:
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    info = manifest["model"]["first_token"]
    assert info["applied"] is True, info
    # the 2-layer student's last layer: output product, residual, LayerNorm, feed-forward (GELU
    # unfused), residual, LayerNorm, and the quantize nodes before each int8 product
    assert info["moved_nodes"] >= 11
    assert len(info["gathered_inputs"]) == 2  # the attention output and the residual
    assert info["max_abs_diff_logits"] <= 1e-4
    graph = onnx.load(str(tiny_bundle_dir / "model_int8.onnx")).graph
    gathers = [n for n in graph.node if n.name.endswith("/first_token_gather")]
    assert sorted(n.input[0] for n in gathers) == sorted(info["gathered_inputs"])
    # the fp32 graph stays the plain export: the gate's reference
    fp32 = onnx.load(str(tiny_bundle_dir / "model_fp32.onnx")).graph
    assert not any(n.name.endswith("/first_token_gather") for n in fp32.node)


@pytest.fixture(scope="module")
def exported(tiny_student_dir: Path, splits: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("first_token")
    return export_step(tiny_student_dir, work, ExportConfig(max_length=32), _small(splits.dev, 40, 3))


@pytest.mark.parametrize("precision", ["fp32", "static int8", "dynamic int8"])
def test_trimmed_graph_answers_real_pairs_as_the_full_graph(
    exported: Any, splits: Any, tmp_path: Path, precision: str
) -> None:
    source = exported.fp32_path
    if precision != "fp32":
        source = tmp_path / "int8.onnx"
        mode = precision.split()[0]
        feeds = calibration_feeds(exported, _small(splits.train, 100, 1)) if mode == "static" else None
        quantize_int8(exported.fp32_path, source, exclude_nodes="auto", mode=mode, calibration=feeds)
    trimmed = tmp_path / "trimmed.onnx"
    info = trim_to_first_token(source, trimmed)
    assert info.applied, info.reason
    pairs = list(splits.ood_test[:300])
    full = _outputs(source, exported.tokenizer_path, pairs)
    trim = _outputs(trimmed, exported.tokenizer_path, pairs)
    if precision == "static int8":  # fixed scales: the kept row is the same integer arithmetic
        np.testing.assert_array_equal(trim.logits, full.logits)
        np.testing.assert_array_equal(trim.pooled, full.pooled)
    else:
        np.testing.assert_allclose(trim.logits, full.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(trim.pooled, full.pooled, rtol=0, atol=1e-5)
    if precision == "dynamic int8":
        # a DynamicQuantizeLinear scales from the whole tensor: the pass stops before it, so every
        # one of them still runs on every token, and only what follows the last one moved
        assert _ops(trimmed)["DynamicQuantizeLinear"] == _ops(source)["DynamicQuantizeLinear"]
        assert info.moved_nodes < 11


def test_first_token_step_keeps_what_answers_and_can_be_turned_off(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    pairs = _small(splits.dev, 40, 3)
    for name, on in (("on", True), ("off", False)):
        cfg = ExportConfig(max_length=32, first_token_last_layer=on)
        ctx = export_step(tiny_student_dir, tmp_path / name, cfg, pairs)
        quantize_int8(ctx.fp32_path, ctx.int8_path, exclude_nodes="auto")
        int8_logits = ctx.load(ctx.int8_path).run(ctx.parity_queries, ctx.parity_items).logits
        before = ctx.int8_path.read_bytes()
        info, trimmed = first_token_step(ctx, int8_logits)
        assert info.applied is on and not list(ctx.work.glob("*_first_token.onnx"))
        if on:  # the trimmed graph replaced the full one and answers as it did
            assert info.max_abs_diff_logits is not None and info.max_abs_diff_logits <= 1e-4
            assert trimmed is not None
            for model in (trimmed, ctx.load(ctx.int8_path)):
                logits = model.run(ctx.parity_queries, ctx.parity_items).logits
                np.testing.assert_allclose(logits, int8_logits, rtol=0, atol=1e-4)
        else:
            assert "turned off" in info.reason and ctx.int8_path.read_bytes() == before
            assert trimmed is None


# Hand-built graphs: input_ids -> embedding (B, L, H) -> [body] -> Gather(axis=1, 0) -> "out".
HIDDEN = 4


def _graph(tmp_path: Path, body: list[Any], last: str, inits: list[Any] | None = None) -> Path:
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(10, HIDDEN)).astype(np.float32), "table")
    zero = numpy_helper.from_array(np.asarray(0, np.int64), "zero")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"]),
        *body,
        helper.make_node("Gather", [last, "zero"], ["out"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "l"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", HIDDEN])],
        [table, zero, *(inits or [])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"input_ids": ids})[0]


def _weight(name: str, shape: tuple[int, ...]) -> Any:
    return numpy_helper.from_array(np.random.default_rng(1).normal(size=shape).astype(np.float32), name)


def test_the_pass_stops_at_an_op_that_mixes_tokens(tmp_path: Path) -> None:
    body = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Softmax", ["h"], ["mixed"], axis=1),  # over tokens
        helper.make_node("Add", ["mixed", "bias"], ["biased"]),
        helper.make_node("Tanh", ["biased"], ["y"]),
    ]
    path = _graph(tmp_path, body, "y", [_weight("w", (HIDDEN, HIDDEN)), _weight("bias", (HIDDEN,))])
    info = trim_to_first_token(path, tmp_path / "t.onnx")
    assert info.applied and info.moved_nodes == 2 and info.gathered_inputs == ("mixed",)
    ids = np.random.default_rng(2).integers(0, 10, size=(5, 6))
    np.testing.assert_allclose(_run(tmp_path / "t.onnx", ids), _run(path, ids), rtol=0, atol=1e-6)


def test_a_tensor_read_beyond_the_first_token_keeps_its_producer(tmp_path: Path) -> None:
    body = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
        helper.make_node("ReduceMax", ["h"], ["peak"], keepdims=0),  # reads every token of h
    ]
    path = _graph(tmp_path, body, "y", [_weight("w", (HIDDEN, HIDDEN))])
    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info("peak", TensorProto.FLOAT, []))
    onnx.save(model, str(path))
    info = trim_to_first_token(path, tmp_path / "t.onnx")
    assert info.moved_nodes == 1 and info.gathered_inputs == ("h",)  # Relu moved, MatMul kept

    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", HIDDEN]))
    onnx.save(model, str(path))  # the gathered tensor itself is an output: every row of it is read
    info = trim_to_first_token(path, tmp_path / "u.onnx")
    assert not info.applied and "read beyond its first token" in info.reason


def test_broadcast_across_tokens_and_graphs_without_the_gather_are_left_alone(tmp_path: Path) -> None:
    # (B, L, H) + (B, 1, H): each output row reads one row of the second operand for every token
    body = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Add", ["x", "mean"], ["y"]),
    ]
    path = _graph(tmp_path, body, "y")
    info = trim_to_first_token(path, tmp_path / "t.onnx")
    assert not info.applied and "no per-token node" in info.reason
    assert not (tmp_path / "t.onnx").exists()

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.output[0] == "out":
            node.attribute[0].i = 2  # Gather over the hidden axis: not the first token
    onnx.save(model, str(path))
    info = trim_to_first_token(path, tmp_path / "t.onnx")
    assert not info.applied and "no Gather" in info.reason


def test_the_benchmarks_count_the_work_the_trimmed_graph_does(tiny_bundle_dir: Path) -> None:
    from bench.common import EncoderShape, token_stats

    shape = EncoderShape(layers=2, hidden=32, ffn=64)
    assert shape.flops_first_token(1) == shape.flops(1)  # one token: nothing to skip
    skipped = shape.flops(14) - shape.flops_first_token(14)
    assert skipped == 13 * (2 * 32 * 32 + 4 * 32 * 64)  # 13 rows of output projection and FFN
    stats = token_stats(tiny_bundle_dir, {3: ("szechwan cuisine", ["mapo doufu", "jazz", "kung pao"])}, shape)
    assert 0 < stats["3"]["int8_graph_gflop"] < stats["3"]["useful_gflop"]
