"""Build a bundle from a trained student: ONNX fp32 + int8, parity gate, calibration, OOD fit.

Everything the runtime needs is measured here on real data and written into one directory by the
runtime's own saver (:func:`darl_lite.bundle.write_bundle`), so export needs no training code:
it reads a saved Hugging Face model folder.
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

import numpy as np
from numpy.typing import NDArray

from darl_lite.bundle import ROLE_TOKENIZER, Bundle, model_role, ood_role, write_bundle
from darl_lite.calibration import fit_temperature
from darl_lite.errors import DarlLiteError, InputError
from darl_lite.export.fuse import FusionInfo, fuse_attention
from darl_lite.export.onnx_export import export_onnx
from darl_lite.export.ood_graph import append_ood_distance
from darl_lite.export.parity import ParityReport, ParityThresholds, check_parity, parity_report, worst_pairs
from darl_lite.export.quantize import QuantizationInfo, detect_preset, quantize_int8, sensitivity_sweep
from darl_lite.inference import OOD_OUTPUT, RelevanceModel, SessionConfig
from darl_lite.metrics import expected_calibration_error
from darl_lite.ood import MahalanobisDetector, threshold_for_coverage
from darl_lite.routing import error_threshold_for_rate
from darl_lite.scorer import softmax
from darl_lite.types import GRADE_GAINS, GRADE_NAMES, Pair

logger = logging.getLogger(__name__)


#: How many of the sweep's worst nodes the manifest lists.
SENSITIVITY_REPORTED = 12
#: Largest |fused - unfused| fp32 logit accepted from attention fusion (float reassociation only).
FUSION_TOLERANCE = 1e-3
#: Largest relative difference of the in-graph OOD score from the numpy detector's.
OOD_GRAPH_TOLERANCE = 1e-4


class ParityError(DarlLiteError):
    """The int8 model answers too differently from fp32; the export is refused."""


@dataclass(frozen=True)
class ExportConfig:
    """How :func:`build_bundle` exports, quantizes, gates and calibrates.

    ``exclude_nodes="auto"`` keeps the classifier head fp32 and, when the parity gate then fails,
    runs a sensitivity sweep (each quantizable node quantized alone, on ``sensitivity_pairs``
    in-distribution dev pairs) and keeps the worst nodes fp32 one at a time, up to
    ``max_sensitive_exclusions``, until the gate passes. ``None`` quantizes everything; a list of
    node names keeps exactly those fp32 (no sweep).
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


def _sample(pairs: Sequence[Pair], n: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    if len(pairs) <= n:
        return list(pairs)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


def _labelled(pairs: Sequence[Pair], name: str) -> tuple[list[str], list[str], NDArray[np.int64]]:
    kept = [p for p in pairs if p.grade is not None]
    if not kept:
        raise InputError(f"{name} pairs carry no human grades; export needs graded pairs to calibrate")
    return [p.query for p in kept], [p.item for p in kept], np.asarray([p.grade for p in kept], np.int64)


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
    ``parity_pairs`` (held out; graded ones also give NDCG retention) feed the parity gate.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = config or ExportConfig()
    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(student_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    n_grades = int(model.config.num_labels)
    session = SessionConfig(intra_op_threads=cfg.threads)

    with tempfile.TemporaryDirectory(prefix="darl-export-") as tmp:
        work = Path(tmp)
        fp32_path, int8_path = work / "model_fp32.onnx", work / "model_int8.onnx"
        export_info = export_onnx(model, tokenizer, fp32_path)
        tokenizer_path = work / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_path))

        def load(path: Path) -> RelevanceModel:
            return RelevanceModel(path, tokenizer_path, max_length=cfg.max_length, session=session)

        fp32 = load(fp32_path)
        pq, pi = [p.query for p in parity_pairs], [p.item for p in parity_pairs]
        fp32_logits = fp32.run(pq, pi).logits

        # Fuse attention for onnxruntime's CPU kernels; kept only if it answers as the fp32 graph does.
        source = fp32_path
        fusion = FusionInfo(False, "turned off (ExportConfig.fuse_attention=False)")
        if cfg.fuse_attention:
            fused_path = work / "model_fused_fp32.onnx"
            fusion = fuse_attention(
                fp32_path,
                fused_path,
                model_type=str(getattr(model.config, "model_type", "")),
                num_heads=int(getattr(model.config, "num_attention_heads", 0) or 0),
                hidden_size=int(getattr(model.config, "hidden_size", 0) or 0),
            )
            if fusion.applied:
                diff = float(np.max(np.abs(load(fused_path).run(pq, pi).logits - fp32_logits)))
                if diff <= FUSION_TOLERANCE:
                    source = fused_path
                    fusion = replace(fusion, max_abs_diff_logits=diff)
                else:
                    logger.warning("fused graph moved logits by %.2e; quantizing the unfused graph", diff)
                    fusion = replace(
                        fusion,
                        applied=False,
                        reason=f"fused logits differ from fp32 by {diff:.2e} > {FUSION_TOLERANCE}",
                        max_abs_diff_logits=diff,
                    )
        preset = detect_preset() if cfg.preset == "auto" else cfg.preset
        quant_info = quantize_int8(
            source,
            int8_path,
            preset=preset,
            per_channel=cfg.per_channel,
            exclude_nodes=list(cfg.exclude_nodes)
            if isinstance(cfg.exclude_nodes, tuple)
            else cfg.exclude_nodes,
        )

        # Parity gate on held-out pairs (int8 against the unfused fp32 graph, the reference).
        graded = all(p.grade is not None for p in parity_pairs)
        grades = np.asarray([p.grade for p in parity_pairs]) if graded else None
        query_ids = [p.query_id or p.query for p in parity_pairs] if graded else None

        def gate() -> tuple[RelevanceModel, NDArray[np.float32], ParityReport, list[str]]:
            model_int8 = load(int8_path)
            logits = model_int8.run(pq, pi).logits
            report = parity_report(
                fp32_logits, logits, grades=grades, query_ids=query_ids, gains=GRADE_GAINS[:n_grades]
            )
            return model_int8, logits, report, check_parity(report, cfg.thresholds)

        int8, int8_logits, parity, failures = gate()
        search = [_search_step(quant_info, parity, failures)]
        if failures and cfg.exclude_nodes == "auto" and cfg.max_sensitive_exclusions > 0:
            quant_info, found, steps = _exclude_sensitive_nodes(
                cfg, preset, source, int8_path, quant_info, dev_pairs, load, gate
            )
            if found is not None:  # None: the sweep found no node to exclude
                int8, int8_logits, parity, failures = found
            search.extend(steps)
        if failures:
            worst = worst_pairs(fp32_logits, int8_logits, k=5)
            listing = "; ".join(f"({pq[i]!r}, {pi[i]!r})" for i in worst)
            message = f"int8 parity gate failed: {'; '.join(failures)}. Worst pairs: {listing}"
            if not cfg.allow_parity_failure:
                raise ParityError(message + ". Re-export with allow_parity_failure (--allow-parity-failure).")
            logger.warning("%s (overridden by allow_parity_failure)", message)

        # Calibration and the uncertainty margin from in-distribution dev pairs (served int8 model).
        tq, ti, ty = _labelled(train_pairs, "train")
        dq, di, dy = _labelled(dev_pairs, "dev")
        dev_int8 = int8.run(dq, di)
        temperature = fit_temperature(dev_int8.logits, dy)
        ece_before = expected_calibration_error(softmax(dev_int8.logits), dy)
        calibrated = softmax(dev_int8.logits, temperature)
        ece_after = expected_calibration_error(calibrated, dy)
        top2 = np.sort(calibrated, axis=1)[:, -2:]
        margin_threshold = float(np.quantile(top2[:, 1] - top2[:, 0], cfg.margin_quantile))
        error_threshold = error_threshold_for_rate(calibrated, cfg.route_rate)

        # OOD statistics per precision (int8 noise shifts the representation), fitted on
        # in-distribution training representations; thresholds from held-out dev pairs.
        ood_files: dict[str, Path] = {}
        ood_thresholds: dict[str, float] = {}
        in_graph: dict[str, float] = {}
        for precision, relevance_model, graph_path in (("int8", int8, int8_path), ("fp32", fp32, fp32_path)):
            detector = MahalanobisDetector.fit(relevance_model.run(tq, ti).pooled, ty)
            dev_pooled = dev_int8.pooled if precision == "int8" else relevance_model.run(dq, di).pooled
            ood_thresholds[precision] = threshold_for_coverage(detector.score(dev_pooled), cfg.ood_coverage)
            ood_files[precision] = work / f"ood_{precision}.npz"
            detector.save(ood_files[precision])
            in_graph[precision] = _ood_into_graph(graph_path, detector, dq, di, load)

        manifest: dict[str, Any] = {
            "max_length": cfg.max_length,
            "grades": {"names": list(GRADE_NAMES[:n_grades]), "gains": list(GRADE_GAINS[:n_grades])},
            "model": {
                "input_names": export_info.input_names,
                "outputs": {"logits": "logits", "pooled": "pooled", "ood": OOD_OUTPUT},
                "export": asdict(export_info),
                "fusion": fusion.to_dict(),
                "default_precision": "int8",
            },
            "quantization": {
                **{k: v for k, v in asdict(quant_info).items() if not k.endswith("_path")},
                "exclusion_search": search,
            },
            "parity": {
                **parity.to_dict(),
                "thresholds": asdict(cfg.thresholds),
                "passed": not failures,
                "overridden": bool(failures) and cfg.allow_parity_failure,
                "failures": failures,
                "pairs": len(parity_pairs),
            },
            "calibration": {
                "method": "temperature",
                "temperature": temperature,
                "ece_before": ece_before,
                "ece_after": ece_after,
                "dev_pairs": len(dy),
            },
            "ood": {
                "method": "mahalanobis",
                "thresholds": ood_thresholds,
                "target_id_coverage": cfg.ood_coverage,
                "fit_pairs": len(ty),
                "threshold_pairs": len(dy),
                "feature_dim": int(export_info.hidden_size),
                "in_graph": {"output": OOD_OUTPUT, "max_rel_diff_vs_numpy": in_graph},
            },
            "routing": {
                "rule": "expected_error",
                "error_threshold": error_threshold,
                "target_route_rate": cfg.route_rate,
                "margin_threshold": margin_threshold,
                "max_route_fraction": cfg.max_route_fraction,
            },
            "teacher": dict(teacher or {}),
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        files = {
            model_role("int8"): int8_path,
            model_role("fp32"): fp32_path,
            ROLE_TOKENIZER: tokenizer_path,
            **{ood_role(precision): path for precision, path in ood_files.items()},
        }
        return write_bundle(out_dir, files, manifest, overwrite=overwrite)


def _ood_into_graph(
    model_path: Path, detector: MahalanobisDetector, queries: list[str], items: list[str], load: Any
) -> float:
    """Write the detector into the graph at ``model_path`` and check it end to end on dev pairs.

    Returns the largest relative difference of the graph's OOD output from
    :meth:`MahalanobisDetector.score` of the same pass's ``pooled`` output.
    """
    append_ood_distance(model_path, detector)
    outputs = load(model_path).run(queries, items)
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


def _search_step(info: QuantizationInfo, report: ParityReport, failures: list[str]) -> dict[str, Any]:
    """One tried exclusion set and how the gate judged it (for the manifest)."""
    return {
        "excluded_nodes": list(info.excluded_nodes),
        "argmax_agreement": report.argmax_agreement,
        "spearman": report.spearman,
        "ndcg_retention": report.ndcg_retention,
        "macro_f1_drop": report.macro_f1_drop,
        "int8_bytes": info.int8_bytes,
        "passed": not failures,
    }


def _exclude_sensitive_nodes(
    cfg: ExportConfig,
    preset: str,
    fp32_path: Path,
    int8_path: Path,
    first: QuantizationInfo,
    dev_pairs: Sequence[Pair],
    load: Any,
    gate: Any,
) -> tuple[QuantizationInfo, Any, list[dict[str, Any]]]:
    """Keep the most quantization-sensitive nodes fp32, one more at a time, until the gate passes.

    Sensitivity is measured on in-distribution dev pairs (never the parity pairs' grades): each
    quantizable node alone is quantized and ranked by the mean KL of the grade distribution from
    fp32 (:func:`sensitivity_sweep`). Returns the last quantization tried, its gate result and
    the steps, for the manifest. Leaves the last tried graph at ``int8_path``.
    """
    sample = _sample(dev_pairs, cfg.sensitivity_pairs, seed=0)
    sq, si = [p.query for p in sample], [p.item for p in sample]
    started = time.perf_counter()

    def logits_of(path: Path) -> NDArray[np.float32]:
        return load(path).run(sq, si).logits

    ranking = sensitivity_sweep(
        fp32_path,
        logits_of,
        preset=preset,
        per_channel=cfg.per_channel,
        always_excluded=first.excluded_nodes,
    )
    logger.info(
        "parity gate failed with %s kept fp32; sensitivity sweep over %d nodes on %d dev pairs took %.0f s",
        first.excluded_nodes or "nothing",
        len(ranking),
        len(sample),
        time.perf_counter() - started,
    )
    reasons = dict(first.exclusion_reasons)
    info, result, steps = first, None, []
    for k, node in enumerate(ranking[: cfg.max_sensitive_exclusions], start=1):
        reasons[node.node] = (
            f"quantization-sensitive: quantized alone it moves the grade distribution by mean KL "
            f"{node.mean_kl:.2e} (rank {k} of {len(ranking)}, {len(sample)} dev pairs); kept fp32 so "
            "the parity gate passes"
        )
        info = quantize_int8(
            fp32_path,
            int8_path,
            preset=preset,
            per_channel=cfg.per_channel,
            exclude_nodes=[*first.excluded_nodes, *(r.node for r in ranking[:k])],
            reasons=reasons,
        )
        result = gate()
        steps.append(_search_step(info, result[2], result[3]))
        logger.info(
            "kept %d sensitive node(s) fp32 (+%s): argmax agreement %.4f, gate %s",
            k,
            node.node,
            result[2].argmax_agreement,
            "passed" if not result[3] else "failed: " + "; ".join(result[3]),
        )
        if not result[3]:
            break
    info = replace(info, sensitivity=[r.to_dict() for r in ranking[:SENSITIVITY_REPORTED]])
    return info, result, steps
