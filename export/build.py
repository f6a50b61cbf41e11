"""Build a bundle from a trained student: ONNX fp32 + int8, parity gate, calibration, OOD fit.

Everything the runtime needs is measured here on real data and written into one directory by the
runtime's own saver (:func:`darl_lite.bundle.write_bundle`), so export needs no training code:
it reads a saved Hugging Face model folder. :func:`build_bundle` is the pipeline as a list of named
steps; the steps live in :mod:`darl_lite.export.build_steps` and :mod:`darl_lite.export.gate`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from darl_lite.bundle import ROLE_TOKENIZER, Bundle, model_role, ood_role, write_bundle
from darl_lite.export.build_steps import (
    FIRST_TOKEN_TOLERANCE,
    FUSION_TOLERANCE,
    OOD_GRAPH_TOLERANCE,
    BuildContext,
    Calibration,
    OodFit,
    calibrate_step,
    export_step,
    first_token_step,
    fit_ood_step,
    fuse_step,
    labelled_step,
    quantize_step,
    routing_step,
)
from darl_lite.export.first_token import FirstTokenInfo
from darl_lite.export.fuse import FusionInfo
from darl_lite.export.gate import SENSITIVITY_REPORTED, GateResult, gate_step, refuse_drift
from darl_lite.export.parity import ParityError, ParityThresholds
from darl_lite.inference import OOD_OUTPUT
from darl_lite.types import GRADE_GAINS, GRADE_NAMES, Pair

__all__ = [
    "FIRST_TOKEN_TOLERANCE",
    "FUSION_TOLERANCE",
    "OOD_GRAPH_TOLERANCE",
    "SENSITIVITY_REPORTED",
    "ExportConfig",
    "ParityError",
    "build_bundle",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """How :func:`build_bundle` exports, quantizes, gates and calibrates.

    ``exclude_nodes="auto"`` keeps the classifier head fp32 and, when the parity gate then fails,
    runs a sensitivity sweep (each quantizable node quantized alone, on ``sensitivity_pairs``
    in-distribution dev pairs) and keeps the worst nodes fp32 one at a time, up to
    ``max_sensitive_exclusions``, until the gate passes. ``None`` quantizes everything; a list of
    node names keeps exactly those fp32 (no sweep).

    ``quant_mode="static"`` fixes the int8 graph's activation scales from ``calibration_pairs``
    training pairs (:func:`darl_lite.export.quantize.static_activation_scales`): on the quickstart
    student it passed the gate with only the head fp32 (dynamic needs one more node fp32), and that
    graph ran 1.07-1.18x faster than the dynamic one at 1 and 2 threads, 1 to 1,000 items
    (``python -m bench.graph_levers --static``, AVX-512 VNNI), agreed better with fp32 (0.9935 vs
    0.9845 on dev pairs), and a pair's scores no longer depend on the pairs batched with it.
    ``"auto"`` (default) takes static with the ``avx512_vnni`` and ``avx2`` presets: on an AVX2-only
    machine (2026-12-02) the static graph with the head alone fp32 ran 1.09-1.23x faster than the
    dynamic one the gate had shipped (three more nodes fp32) at 1 thread, 1.01-1.23x at 2, and
    agreed better with fp32 (0.9935 vs 0.9875); ``arm64`` stays dynamic (never measured). If the
    static graph fails the gate, the sensitivity search runs as in dynamic mode and re-quantizes
    dynamically (the manifest's ``quantization.mode`` says which one shipped).
    """

    max_length: int = 64
    preset: str = "auto"  # "auto": detected from this CPU (see quantize.detect_preset)
    per_channel: bool = True
    exclude_nodes: str | tuple[str, ...] | None = "auto"
    max_sensitive_exclusions: int = 8
    sensitivity_pairs: int = 256
    ood_coverage: float = 0.95  # share of in-distribution dev pairs kept below the OOD threshold
    margin_quantile: float = 0.05  # threshold_excess rule: share of in-distribution dev pairs uncertain
    route_rate: float = 0.10  # expected_error rule (the default): share of in-distribution dev pairs routed
    max_route_fraction: float = 0.25
    thresholds: ParityThresholds = field(default_factory=ParityThresholds)
    allow_parity_failure: bool = False  # recorded in the manifest when used
    threads: int = 0
    fuse_attention: bool = True  # see darl_lite.export.fuse
    first_token_last_layer: bool = True  # see darl_lite.export.first_token
    quant_mode: str = "auto"  # "auto" | "dynamic" | "static" (see above and darl_lite.export.quantize)
    calibration_pairs: int = 384  # static mode: training pairs the activation scales are fitted on
    static_percentile: float = 99.99  # static mode: percentile of each activation the scale covers


def build_bundle(
    student_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    train_pairs: Sequence[Pair],
    dev_pairs: Sequence[Pair],
    parity_pairs: Sequence[Pair],
    teacher: Mapping[str, Any] | None = None,
    config: ExportConfig | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Export ``student_dir`` (a saved HF sequence-classification model) to a verified bundle.

    ``train_pairs`` (in-distribution, graded) fit the OOD statistics; ``dev_pairs`` (in-distribution,
    graded) set the calibration temperature, the OOD threshold and the uncertainty margin;
    ``parity_pairs`` (held out; graded ones also give NDCG retention) feed the parity gate. Raises
    :class:`ParityError`, writing nothing, when int8 drifts from fp32 and no override is set.
    """
    cfg = config or ExportConfig()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="darl-export-") as tmp:
        ctx = export_step(student_dir, Path(tmp), cfg, parity_pairs)
        source, fusion = fuse_step(ctx)
        preset, quantization = quantize_step(ctx, source, train_pairs)
        gate = gate_step(ctx, preset, source, quantization, dev_pairs)
        if quantization.mode != gate.quantization.mode:
            logger.warning(
                "the %s int8 graph failed the parity gate with %s fp32; the exclusion search "
                "re-quantized it %s",
                quantization.mode,
                quantization.excluded_nodes,
                gate.quantization.mode,
            )
        refuse_drift(ctx, gate)
        first_token, trimmed = first_token_step(ctx, gate.int8_logits)
        if trimmed is not None:
            gate = replace(gate, int8=trimmed)  # the graph that ships
        train, dev = labelled_step(train_pairs, "train"), labelled_step(dev_pairs, "dev")
        calibration = calibrate_step(gate.int8, dev)
        routing = routing_step(cfg, calibration)
        ood = fit_ood_step(ctx, gate.int8, train, dev, calibration)
        manifest = manifest_step(ctx, fusion, first_token, gate, calibration, ood, routing, teacher)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        return write_bundle(out_dir, bundle_files(ctx, ood), manifest, overwrite=overwrite)


def bundle_files(ctx: BuildContext, ood: OodFit) -> dict[str, Path]:
    """The bundle's files by role, as :func:`darl_lite.bundle.write_bundle` takes them."""
    return {
        model_role("int8"): ctx.int8_path,
        model_role("fp32"): ctx.fp32_path,
        ROLE_TOKENIZER: ctx.tokenizer_path,
        **{ood_role(precision): path for precision, path in ood.files.items()},
    }


def manifest_step(
    ctx: BuildContext,
    fusion: FusionInfo,
    first_token: FirstTokenInfo,
    gate: GateResult,
    calibration: Calibration,
    ood: OodFit,
    routing: dict[str, Any],
    teacher: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest (without ``export_seconds``): what every step measured, in plain values."""
    cfg = ctx.cfg
    return {
        "max_length": cfg.max_length,
        "grades": {"names": list(GRADE_NAMES[: ctx.n_grades]), "gains": list(GRADE_GAINS[: ctx.n_grades])},
        "model": {
            "input_names": ctx.export_info.input_names,
            "outputs": {"logits": "logits", "pooled": "pooled", "ood": OOD_OUTPUT},
            "export": asdict(ctx.export_info),
            "fusion": fusion.to_dict(),
            "first_token": first_token.to_dict(),  # the int8 graph's (darl_lite.export.first_token)
            "default_precision": "int8",
        },
        "quantization": {
            **{k: v for k, v in asdict(gate.quantization).items() if not k.endswith("_path")},
            "requested_mode": cfg.quant_mode,
            "exclusion_search": gate.search,
        },
        "parity": {
            **gate.report.to_dict(),
            "thresholds": asdict(cfg.thresholds),
            "passed": gate.passed,
            "overridden": not gate.passed and cfg.allow_parity_failure,
            "failures": gate.failures,
            "pairs": len(ctx.parity_queries),
        },
        "calibration": {
            "method": "temperature",
            "temperature": calibration.temperature,
            "ece_before": calibration.ece_before,
            "ece_after": calibration.ece_after,
            "dev_pairs": calibration.dev_pairs,
        },
        "ood": {
            "method": "mahalanobis",
            "thresholds": ood.thresholds,
            "id_quantiles": ood.id_quantiles,  # the runtime's OOD percentile (darl_lite.ood_scale)
            "target_id_coverage": cfg.ood_coverage,
            "fit_pairs": ood.fit_pairs,
            "threshold_pairs": ood.threshold_pairs,
            "feature_dim": int(ctx.export_info.hidden_size),
            "in_graph": {"output": OOD_OUTPUT, "max_rel_diff_vs_numpy": ood.in_graph_rel_diff},
        },
        "routing": routing,
        "teacher": dict(teacher or {}),
    }
