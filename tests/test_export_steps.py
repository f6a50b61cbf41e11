"""The bundle build's steps one by one, and the refusal of a drifting int8 model (tiny student from
conftest, real export and onnxruntime; a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from darl_lite.errors import InputError
from darl_lite.export import ParityError
from darl_lite.export.build import ExportConfig, build_bundle
from darl_lite.export.build_steps import (
    BuildContext,
    calibrate_step,
    export_step,
    fuse_step,
    labelled_step,
    quantize_step,
    routing_step,
)
from darl_lite.export.gate import gate_step, refuse_drift
from darl_lite.export.parity import ParityThresholds
from darl_lite.types import Pair

#: No int8 graph agrees with fp32 on more than all pairs: the gate cannot pass.
IMPOSSIBLE = ParityThresholds(min_argmax_agreement=1.01, min_spearman=-1.0, min_ndcg_retention=0.0)


def _small(pairs: tuple[Pair, ...], n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


def _context(student: Path, work: Path, splits: Any, **config: Any) -> BuildContext:
    cfg = ExportConfig(max_length=32, **config)
    return export_step(student, work, cfg, _small(splits.dev, 80, 3))


def test_export_step_runs_fp32_on_the_parity_pairs(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    ctx = _context(tiny_student_dir, tmp_path, splits)
    assert ctx.fp32_path.is_file() and ctx.tokenizer_path.is_file() and not ctx.int8_path.exists()
    assert ctx.fp32_logits.shape == (80, 3) and ctx.n_grades == 3
    assert ctx.parity_grades is not None and len(ctx.parity_grades) == 80
    again = ctx.load(ctx.fp32_path).run(ctx.parity_queries, ctx.parity_items).logits
    np.testing.assert_allclose(again, ctx.fp32_logits, rtol=0, atol=1e-6)


def test_fuse_step_off_and_on(tiny_student_dir: Path, splits: Any, tmp_path: Path) -> None:
    off = _context(tiny_student_dir, tmp_path / "off", splits, fuse_attention=False)
    source, info = fuse_step(off)
    assert source == off.fp32_path and not info.applied and "turned off" in info.reason
    on = _context(tiny_student_dir, tmp_path / "on", splits)
    source, info = fuse_step(on)
    if info.applied:  # fusion kept: the fused graph answers as fp32 within the tolerance
        assert source.name == "model_fused_fp32.onnx" and info.max_abs_diff_logits is not None
        assert info.max_abs_diff_logits <= 1e-3
    else:
        assert source == on.fp32_path


def test_quantize_and_gate_steps_pass_a_faithful_int8_graph(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    relaxed = ParityThresholds(min_argmax_agreement=0.5, min_spearman=0.5, min_ndcg_retention=0.5)
    ctx = _context(tiny_student_dir, tmp_path, splits, thresholds=relaxed)
    source, _ = fuse_step(ctx)
    preset, quantization = quantize_step(ctx, source)
    assert ctx.int8_path.is_file() and quantization.int8_bytes < quantization.fp32_bytes
    gate = gate_step(ctx, preset, source, quantization, _small(splits.dev, 60, 2))
    assert gate.passed and gate.failures == [] and len(gate.search) == 1
    assert gate.report.argmax_agreement >= 0.5
    refuse_drift(ctx, gate)  # a passing gate is not refused


def test_labelled_step_names_the_split_without_grades() -> None:
    graded = labelled_step([Pair("q", "a", 2), Pair("q", "b")], "dev")
    assert graded.queries == ["q"] and graded.grades.tolist() == [2]
    with pytest.raises(InputError, match="train pairs carry no human grades"):
        labelled_step([Pair("q", "a")], "train")


def test_calibrate_and_routing_steps(tiny_student_dir: Path, splits: Any, tmp_path: Path) -> None:
    ctx = _context(tiny_student_dir, tmp_path, splits)
    dev = labelled_step(_small(splits.dev, 120, 2), "dev")
    calibration = calibrate_step(ctx.fp32, dev)
    assert calibration.temperature > 0 and calibration.dev_pairs == 120
    np.testing.assert_allclose(calibration.probabilities.sum(axis=1), 1.0, atol=1e-6)
    routing = routing_step(ctx.cfg, calibration)
    expected_error = 1.0 - calibration.probabilities.max(axis=1)
    routed = float(np.mean(expected_error > routing["error_threshold"]))
    assert routing["rule"] == "expected_error" and routed <= ctx.cfg.route_rate + 1e-9
    assert 0.0 <= routing["margin_threshold"] <= 1.0


def test_corrupted_weights_between_fp32_and_int8_are_refused(
    tiny_student_dir: Path, splits: Any, tmp_path: Path
) -> None:
    # the fp32 reference logits come from the true graph; then the graph's largest weights are
    # scrambled on disk, so the int8 graph quantized from it drifts under the default thresholds
    ctx = _context(tiny_student_dir, tmp_path, splits, fuse_attention=False, exclude_nodes=None)
    proto = onnx.load(str(ctx.fp32_path))
    rng = np.random.default_rng(0)
    weights = sorted(proto.graph.initializer, key=lambda i: -int(np.prod(i.dims)))[:4]
    for init in weights:
        values = numpy_helper.to_array(init)
        scrambled = rng.permutation(values.ravel()).reshape(values.shape) * 5.0
        init.CopyFrom(numpy_helper.from_array(scrambled.astype(values.dtype), init.name))
    onnx.save(proto, str(ctx.fp32_path))
    preset, quantization = quantize_step(ctx, ctx.fp32_path)
    gate = gate_step(ctx, preset, ctx.fp32_path, quantization, _small(splits.dev, 60, 2))
    assert not gate.passed
    with pytest.raises(ParityError, match=r"int8 parity gate failed: .*Worst pairs: \("):
        refuse_drift(ctx, gate)


def test_drifting_int8_model_raises_and_writes_no_bundle(
    tiny_student_dir: Path, tiny_bundle_dir: Path, splits: Any, tmp_path: Path
) -> None:
    args: dict[str, Any] = {
        "train_pairs": _small(splits.train, 200, 1),
        "dev_pairs": _small(splits.dev, 120, 2),
        "parity_pairs": _small(splits.dev, 80, 3),
    }
    config = ExportConfig(
        max_length=32, thresholds=IMPOSSIBLE, max_sensitive_exclusions=1, sensitivity_pairs=20
    )
    fresh = tmp_path / "fresh" / "bundle"
    with pytest.raises(ParityError, match="allow_parity_failure") as refused:
        build_bundle(tiny_student_dir, fresh, config=config, **args)
    assert "argmax agreement" in str(refused.value) and "Worst pairs" in str(refused.value)
    assert not fresh.exists() and not fresh.parent.exists(), "a refused export writes nothing"

    # overwrite=True does not let a refused export replace a good bundle
    existing = tmp_path / "existing"
    import shutil

    shutil.copytree(tiny_bundle_dir, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(ParityError):
        build_bundle(tiny_student_dir, existing, config=config, overwrite=True, **args)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"], "no staging directory left"
    assert json.loads((existing / "manifest.json").read_text())["parity"]["passed"] is True
