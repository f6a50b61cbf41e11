"""The parity gate step of the bundle build: judge int8 against fp32, keep sensitive nodes fp32 until
it passes, and refuse a model that still drifts (:class:`ParityError`).

The reference is the unfused fp32 graph on the held-out parity pairs (:class:`BuildContext`).
Sensitivity is measured on in-distribution dev pairs, never on the parity pairs' grades.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.export.build_steps import BuildContext
from darl_lite.export.parity import ParityError, ParityReport, check_parity, parity_report, worst_pairs
from darl_lite.export.quantize import QuantizationInfo, quantize_int8, sensitivity_sweep
from darl_lite.inference import RelevanceModel
from darl_lite.types import GRADE_GAINS, Pair

logger = logging.getLogger(__name__)

#: How many of the sweep's worst nodes the manifest lists.
SENSITIVITY_REPORTED = 12


@dataclass(frozen=True)
class GateResult:
    """The int8 graph the gate judged last, its verdict and every exclusion set tried."""

    int8: RelevanceModel
    int8_logits: NDArray[np.float32]
    report: ParityReport
    failures: list[str]
    quantization: QuantizationInfo
    search: list[dict[str, Any]]  # one entry per tried exclusion set, for the manifest

    @property
    def passed(self) -> bool:
        return not self.failures


def judge_int8(ctx: BuildContext, quantization: QuantizationInfo, search: list[dict[str, Any]]) -> GateResult:
    """Load the int8 graph at :attr:`BuildContext.int8_path` and judge it on the parity pairs."""
    pairs_graded = ctx.parity_grades is not None
    model_int8 = ctx.load(ctx.int8_path)
    logits = model_int8.run(ctx.parity_queries, ctx.parity_items).logits
    report = parity_report(
        ctx.fp32_logits,
        logits,
        grades=ctx.parity_grades,
        query_ids=ctx.parity_query_ids if pairs_graded else None,
        gains=GRADE_GAINS[: ctx.n_grades],
    )
    failures = check_parity(report, ctx.cfg.thresholds)
    return GateResult(
        model_int8,
        logits,
        report,
        failures,
        quantization,
        [*search, _search_step(quantization, report, failures)],
    )


def gate_step(
    ctx: BuildContext, preset: str, source: Path, quantization: QuantizationInfo, dev_pairs: Sequence[Pair]
) -> GateResult:
    """Judge the int8 graph; with ``exclude_nodes="auto"``, search for fp32 exclusions until it passes."""
    cfg = ctx.cfg
    result = judge_int8(ctx, quantization, [])
    if result.passed or cfg.exclude_nodes != "auto" or cfg.max_sensitive_exclusions <= 0:
        return result
    return _exclude_sensitive_nodes(ctx, preset, source, result, dev_pairs)


def refuse_drift(ctx: BuildContext, result: GateResult) -> None:
    """Raise :class:`ParityError` (no bundle written) unless the gate passed or the override is set."""
    if result.passed:
        return
    worst = worst_pairs(ctx.fp32_logits, result.int8_logits, k=5)
    listing = "; ".join(f"({ctx.parity_queries[i]!r}, {ctx.parity_items[i]!r})" for i in worst)
    message = f"int8 parity gate failed: {'; '.join(result.failures)}. Worst pairs: {listing}"
    if not ctx.cfg.allow_parity_failure:
        raise ParityError(message + ". Re-export with allow_parity_failure (--allow-parity-failure).")
    logger.warning("%s (overridden by allow_parity_failure)", message)


def _sample(pairs: Sequence[Pair], n: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    if len(pairs) <= n:
        return list(pairs)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


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
    ctx: BuildContext, preset: str, source: Path, first: GateResult, dev_pairs: Sequence[Pair]
) -> GateResult:
    """Keep the most quantization-sensitive nodes fp32, one more at a time, until the gate passes.

    Each quantizable node alone is quantized and ranked by the mean KL of the grade distribution
    from fp32 (:func:`sensitivity_sweep`) on in-distribution dev pairs. Returns the last gate result
    (the first one when the sweep finds no node), with the sweep's ranking in its quantization info.
    Leaves the last tried graph at ``ctx.int8_path``.
    """
    cfg = ctx.cfg
    sample = _sample(dev_pairs, cfg.sensitivity_pairs, seed=0)
    sq, si = [p.query for p in sample], [p.item for p in sample]
    started = time.perf_counter()
    excluded = first.quantization.excluded_nodes
    ranking = sensitivity_sweep(
        source,
        lambda path: ctx.load(path).run(sq, si).logits,
        preset=preset,
        per_channel=cfg.per_channel,
        always_excluded=excluded,
    )
    logger.info(
        "parity gate failed with %s kept fp32; sensitivity sweep over %d nodes on %d dev pairs took %.0f s",
        excluded or "nothing",
        len(ranking),
        len(sample),
        time.perf_counter() - started,
    )
    reasons = dict(first.quantization.exclusion_reasons)
    result = first
    for k, node in enumerate(ranking[: cfg.max_sensitive_exclusions], start=1):
        reasons[node.node] = (
            f"quantization-sensitive: quantized alone it moves the grade distribution by mean KL "
            f"{node.mean_kl:.2e} (rank {k} of {len(ranking)}, {len(sample)} dev pairs); kept fp32 so "
            "the parity gate passes"
        )
        info = quantize_int8(
            source,
            ctx.int8_path,
            preset=preset,
            per_channel=cfg.per_channel,
            exclude_nodes=[*excluded, *(r.node for r in ranking[:k])],
            reasons=reasons,
        )
        result = judge_int8(ctx, info, result.search)
        logger.info(
            "kept %d sensitive node(s) fp32 (+%s): argmax agreement %.4f, gate %s",
            k,
            node.node,
            result.report.argmax_agreement,
            "passed" if result.passed else "failed: " + "; ".join(result.failures),
        )
        if result.passed:
            break
    sensitivity = [r.to_dict() for r in ranking[:SENSITIVITY_REPORTED]]
    return replace(result, quantization=replace(result.quantization, sensitivity=sensitivity))
