"""The steps of :func:`darl_lite.export.build.build_bundle`, one function each, in pipeline order.

export → fuse → quantize → (gate, in :mod:`darl_lite.export.gate`) → first token → calibrate →
routing → fit OOD. Each step takes what earlier steps measured and returns a small frozen record, so
the pipeline reads as a list of named steps and each one can be run and tested alone. Files are
written into the build's work directory (:attr:`BuildContext.work`); the bundle is written only
after every step ran.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import fit_temperature, softmax
from darl_lite.errors import InputError
from darl_lite.export.first_token import FirstTokenInfo, trim_to_first_token
from darl_lite.export.fuse import FusionInfo, fuse_attention
from darl_lite.export.onnx_export import OnnxExportInfo, export_onnx
from darl_lite.export.ood_graph import append_ood_distance
from darl_lite.export.quantize import QuantizationInfo, detect_preset, quantize_int8
from darl_lite.inference import OOD_OUTPUT, ModelOutputs, RelevanceModel, SessionConfig
from darl_lite.metrics import expected_calibration_error
from darl_lite.ood import MahalanobisDetector, threshold_for_coverage
from darl_lite.ood_scale import id_quantile_table
from darl_lite.routing import error_threshold_for_rate
from darl_lite.types import Pair

if TYPE_CHECKING:
    from darl_lite.export.build import ExportConfig

logger = logging.getLogger(__name__)

#: Largest |fused - unfused| fp32 logit accepted from attention fusion (float reassociation only).
FUSION_TOLERANCE = 1e-3
#: Largest |trimmed - untrimmed| logit on the parity pairs for a first-token graph to be kept: each
#: moved node computes every row on its own (measured on MiniLM-L6: 0 for static int8, 5e-7 fp32).
FIRST_TOKEN_TOLERANCE = 1e-4
#: Largest relative difference of the in-graph OOD score from the numpy detector's.
OOD_GRAPH_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BuildContext:
    """What every step shares: the config, the work directory, the fp32 reference on parity pairs."""

    cfg: ExportConfig
    work: Path
    export_info: OnnxExportInfo
    model_config: Any  # the student's transformers config (model type, heads, hidden size)
    n_grades: int
    session: SessionConfig
    parity_queries: list[str]
    parity_items: list[str]
    parity_grades: NDArray[Any] | None  # None unless every parity pair carries a human grade
    parity_query_ids: list[str]
    fp32: RelevanceModel
    fp32_logits: NDArray[np.float32]

    @property
    def fp32_path(self) -> Path:
        return self.work / "model_fp32.onnx"

    @property
    def int8_path(self) -> Path:
        return self.work / "model_int8.onnx"

    @property
    def tokenizer_path(self) -> Path:
        return self.work / "tokenizer.json"

    def load(self, path: Path) -> RelevanceModel:
        """An onnxruntime model of the graph at ``path`` with the bundle's tokenizer and max length."""
        return RelevanceModel(path, self.tokenizer_path, max_length=self.cfg.max_length, session=self.session)


@dataclass(frozen=True)
class LabelledSet:
    """The graded pairs of one split, as the model runner takes them."""

    queries: list[str]
    items: list[str]
    grades: NDArray[np.int64]


@dataclass(frozen=True)
class Calibration:
    """Temperature fitted on in-distribution dev pairs with the served (int8) model."""

    temperature: float
    ece_before: float
    ece_after: float
    dev_pairs: int
    probabilities: NDArray[np.float64]  # calibrated dev distributions, for the routing thresholds
    dev_outputs: ModelOutputs  # the int8 pass over the dev pairs (its pooled output feeds the OOD fit)


@dataclass(frozen=True)
class OodFit:
    """Per-precision Mahalanobis detectors: files written, thresholds, in-graph check."""

    files: dict[str, Path]
    thresholds: dict[str, float]
    in_graph_rel_diff: dict[str, float]
    fit_pairs: int
    threshold_pairs: int
    #: per precision, the in-distribution dev scores' quantile table (darl_lite.ood_scale)
    id_quantiles: dict[str, list[float]] = field(default_factory=dict)


def export_step(
    student_dir: str | os.PathLike[str], work: Path, cfg: ExportConfig, parity_pairs: Sequence[Pair]
) -> BuildContext:
    """Export the saved HF student to fp32 ONNX and its tokenizer; run fp32 on the parity pairs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(student_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    export_info = export_onnx(model, tokenizer, work / "model_fp32.onnx")
    tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
    session = SessionConfig(intra_op_threads=cfg.threads)
    fp32 = RelevanceModel(
        work / "model_fp32.onnx", work / "tokenizer.json", max_length=cfg.max_length, session=session
    )
    queries, items = [p.query for p in parity_pairs], [p.item for p in parity_pairs]
    graded = all(p.grade is not None for p in parity_pairs)
    return BuildContext(
        cfg=cfg,
        work=work,
        export_info=export_info,
        model_config=model.config,
        n_grades=int(model.config.num_labels),
        session=session,
        parity_queries=queries,
        parity_items=items,
        parity_grades=np.asarray([p.grade for p in parity_pairs]) if graded else None,
        parity_query_ids=[p.query_id or p.query for p in parity_pairs],
        fp32=fp32,
        fp32_logits=fp32.run(queries, items).logits,
    )


def fuse_step(ctx: BuildContext) -> tuple[Path, FusionInfo]:
    """Fuse attention for onnxruntime's CPU kernels; kept only if it answers as the fp32 graph does.

    Returns the graph to quantize (the fused one, or the plain fp32 one) and what happened.
    """
    if not ctx.cfg.fuse_attention:
        return ctx.fp32_path, FusionInfo(False, "turned off (ExportConfig.fuse_attention=False)")
    config = ctx.model_config
    fused_path = ctx.work / "model_fused_fp32.onnx"
    fusion = fuse_attention(
        ctx.fp32_path,
        fused_path,
        model_type=str(getattr(config, "model_type", "")),
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
    )
    if not fusion.applied:
        return ctx.fp32_path, fusion
    fused_logits = ctx.load(fused_path).run(ctx.parity_queries, ctx.parity_items).logits
    diff = float(np.max(np.abs(fused_logits - ctx.fp32_logits)))
    if diff <= FUSION_TOLERANCE:
        return fused_path, replace(fusion, max_abs_diff_logits=diff)
    logger.warning("fused graph moved logits by %.2e; quantizing the unfused graph", diff)
    return ctx.fp32_path, replace(
        fusion,
        applied=False,
        reason=f"fused logits differ from fp32 by {diff:.2e} > {FUSION_TOLERANCE}",
        max_abs_diff_logits=diff,
    )


def first_token_step(
    ctx: BuildContext, int8_logits: NDArray[np.float32]
) -> tuple[FirstTokenInfo, RelevanceModel | None]:
    """Run the int8 graph's last layer after its attention on the first token only
    (:mod:`darl_lite.export.first_token`); kept only if the graph answers the parity pairs as
    before, within :data:`FIRST_TOKEN_TOLERANCE`. The fp32 graph stays the plain export: the
    reference the gate compares against and the graph the benchmarks build their variants from.

    Returns what happened and, when the trimmed graph replaced the int8 one, its checked model
    (None: the int8 graph is as the gate left it).
    """
    if not ctx.cfg.first_token_last_layer:
        return FirstTokenInfo(False, "turned off (ExportConfig.first_token_last_layer=False)"), None
    trimmed = ctx.work / "model_int8_first_token.onnx"
    info = trim_to_first_token(ctx.int8_path, trimmed)
    if not info.applied:
        return info, None
    model = ctx.load(trimmed)
    logits = model.run(ctx.parity_queries, ctx.parity_items).logits
    diff = float(np.max(np.abs(logits - int8_logits)))
    if diff > FIRST_TOKEN_TOLERANCE:
        logger.warning("the first-token int8 graph moved logits by %.2e; the full graph ships", diff)
        trimmed.unlink()
        reason = f"trimmed logits differ by {diff:.2e} > {FIRST_TOKEN_TOLERANCE}"
        return replace(info, applied=False, reason=reason, max_abs_diff_logits=diff), None
    os.replace(trimmed, ctx.int8_path)  # the loaded session keeps the graph it read
    return replace(info, max_abs_diff_logits=diff), model


def quantize_step(
    ctx: BuildContext, source: Path, calibration_pairs: Sequence[Pair] = ()
) -> tuple[str, QuantizationInfo]:
    """Quantize ``source`` to int8 at :attr:`BuildContext.int8_path`; returns the preset used.

    With ``ExportConfig.quant_mode="static"`` the activation scales are fixed from
    ``cfg.calibration_pairs`` of ``calibration_pairs`` (in-distribution training pairs, sampled with
    a fixed seed), tokenised and batched the runtime's way (:func:`calibration_feeds`).
    """
    cfg = ctx.cfg
    preset = detect_preset() if cfg.preset == "auto" else cfg.preset
    exclude = list(cfg.exclude_nodes) if isinstance(cfg.exclude_nodes, tuple) else cfg.exclude_nodes
    mode = resolve_quant_mode(cfg.quant_mode, preset)
    if mode == "static" and cfg.quant_mode == "auto" and not calibration_pairs:
        mode = "dynamic"  # auto without calibration pairs: the scales would have nothing to see
    feeds = calibration_feeds(ctx, calibration_pairs) if mode == "static" else None
    info = quantize_int8(
        source,
        ctx.int8_path,
        preset=preset,
        per_channel=cfg.per_channel,
        exclude_nodes=exclude,
        mode=mode,
        calibration=feeds,
        percentile=cfg.static_percentile,
    )
    return preset, info


#: Presets whose ``quant_mode="auto"`` is static: measured faster than dynamic and closer to fp32
#: (``python -m bench.graph_levers --static``) on AVX-512 VNNI and on AVX2 (both 2026-12-02).
STATIC_PRESETS = frozenset({"avx512_vnni", "avx2"})


def resolve_quant_mode(requested: str, preset: str) -> Literal["dynamic", "static"]:
    """``"auto"`` -> static with the ``avx512_vnni`` and ``avx2`` presets (measured faster and
    closer to fp32 on both), dynamic with ``arm64`` (never measured); ``"static"`` / ``"dynamic"``
    as asked."""
    if requested == "auto":
        return "static" if preset in STATIC_PRESETS else "dynamic"
    if requested not in ("dynamic", "static"):
        raise InputError(f"ExportConfig.quant_mode must be 'auto', 'dynamic' or 'static', not {requested!r}")
    return "static" if requested == "static" else "dynamic"


def calibration_feeds(ctx: BuildContext, pairs: Sequence[Pair]) -> list[dict[str, NDArray[np.int64]]]:
    """The runtime's batches (tokeniser, max length, length-sorted batches) of ``cfg.calibration_pairs``
    pairs sampled from ``pairs`` with seed 0; static scales must see inputs as the runtime feeds them."""
    if not pairs:
        raise InputError("quant_mode='static' needs calibration pairs: pass train_pairs to build_bundle")
    n = min(ctx.cfg.calibration_pairs, len(pairs))
    if n < 1:
        raise InputError(f"ExportConfig.calibration_pairs must be >= 1, got {ctx.cfg.calibration_pairs}")
    picked = sorted(np.random.default_rng(0).choice(len(pairs), size=n, replace=False))
    plan = ctx.fp32.plan([pairs[i].query for i in picked], [pairs[i].item for i in picked])
    return [feeds for _, feeds in plan.batches]


def labelled_step(pairs: Sequence[Pair], name: str) -> LabelledSet:
    """The graded pairs of ``pairs``; export needs graded pairs to calibrate and fit the OOD detector."""
    kept = [p for p in pairs if p.grade is not None]
    if not kept:
        raise InputError(f"{name} pairs carry no human grades; export needs graded pairs to calibrate")
    return LabelledSet(
        [p.query for p in kept], [p.item for p in kept], np.asarray([p.grade for p in kept], np.int64)
    )


def calibrate_step(int8: RelevanceModel, dev: LabelledSet) -> Calibration:
    """Fit the temperature on in-distribution dev pairs with the served int8 model."""
    outputs = int8.run(dev.queries, dev.items)
    temperature = fit_temperature(outputs.logits, dev.grades)
    calibrated = softmax(outputs.logits, temperature)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(softmax(outputs.logits), dev.grades),
        ece_after=expected_calibration_error(calibrated, dev.grades),
        dev_pairs=len(dev.grades),
        probabilities=calibrated,
        dev_outputs=outputs,
    )


def routing_step(cfg: ExportConfig, calibration: Calibration) -> dict[str, Any]:
    """The router's thresholds from the calibrated dev distributions (the manifest's ``routing``)."""
    top2 = np.sort(calibration.probabilities, axis=1)[:, -2:]
    return {
        "rule": "expected_error",
        "error_threshold": error_threshold_for_rate(calibration.probabilities, cfg.route_rate),
        "target_route_rate": cfg.route_rate,
        "margin_threshold": float(np.quantile(top2[:, 1] - top2[:, 0], cfg.margin_quantile)),
        "max_route_fraction": cfg.max_route_fraction,
    }


def fit_ood_step(
    ctx: BuildContext, int8: RelevanceModel, train: LabelledSet, dev: LabelledSet, calibration: Calibration
) -> OodFit:
    """Fit one OOD detector per precision and write it into that precision's graph.

    Statistics per precision (int8 noise shifts the representation), fitted on in-distribution
    training representations; thresholds from held-out dev pairs at ``cfg.ood_coverage``.
    """
    files: dict[str, Path] = {}
    thresholds: dict[str, float] = {}
    quantiles: dict[str, list[float]] = {}
    in_graph: dict[str, float] = {}
    for precision, model, graph_path in (("int8", int8, ctx.int8_path), ("fp32", ctx.fp32, ctx.fp32_path)):
        detector = MahalanobisDetector.fit(model.run(train.queries, train.items).pooled, train.grades)
        dev_pooled = (
            calibration.dev_outputs.pooled
            if precision == "int8"
            else model.run(dev.queries, dev.items).pooled
        )
        dev_scores = detector.score(dev_pooled)
        thresholds[precision] = threshold_for_coverage(dev_scores, ctx.cfg.ood_coverage)
        quantiles[precision] = id_quantile_table(dev_scores)  # the runtime's OOD percentile scale
        files[precision] = ctx.work / f"ood_{precision}.npz"
        detector.save(files[precision])
        in_graph[precision] = ood_into_graph(ctx, graph_path, detector, dev)
    return OodFit(files, thresholds, in_graph, len(train.grades), len(dev.grades), id_quantiles=quantiles)


def ood_into_graph(
    ctx: BuildContext, model_path: Path, detector: MahalanobisDetector, dev: LabelledSet
) -> float:
    """Write the detector into the graph at ``model_path`` and check it end to end on dev pairs.

    Returns the largest relative difference of the graph's OOD output from
    :meth:`MahalanobisDetector.score` of the same pass's ``pooled`` output.
    """
    append_ood_distance(model_path, detector)
    outputs = ctx.load(model_path).run(dev.queries, dev.items)
    if outputs.ood is None:
        raise RuntimeError(
            f"{model_path} was written without its {OOD_OUTPUT!r} output; no bundle was written. "
            "This onnx/onnxruntime pair drops appended outputs: report it with both versions"
        )
    numpy_scores = detector.score(outputs.pooled)
    rel = float(np.max(np.abs(outputs.ood - numpy_scores) / np.maximum(np.abs(numpy_scores), 1e-6)))
    if rel > OOD_GRAPH_TOLERANCE:
        raise RuntimeError(
            f"the OOD nodes written into {model_path} differ from the numpy detector by {rel:.2e} "
            f"(relative) on dev pairs; tolerance {OOD_GRAPH_TOLERANCE}. No bundle was written: report it "
            "with the onnxruntime version (the numpy detector in darl_lite.ood is the reference)"
        )
    return rel
