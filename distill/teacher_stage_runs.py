"""Stages 1, 2 and 3 of the recipe for one seed, from the cut cache (the work of ``teacher-stages``)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import fit_temperature
from darl_lite.datasets import Splits
from darl_lite.distill.cut_cache import CutCache
from darl_lite.distill.decoder_blocks import DecoderParts
from darl_lite.distill.llm_teacher import (
    FeatureTable,
    ProbeHead,
    augmentation_pairs,
    train_probe,
)
from darl_lite.distill.staged_teacher import save_top, softmax
from darl_lite.distill.teacher_stage_config import EVAL_SPLITS, StagesConfig
from darl_lite.distill.top_tune import (
    TopModel,
    head_arrays,
    predict_logits,
    set_interpolation,
    train_top,
)
from darl_lite.metrics import grading_report
from darl_lite.types import Pair

logger = logging.getLogger("darl_lite.distill.teacher_stages")


@dataclass
class Hooks:
    """Called after each newly computed cache chunk / training step (progress; tests interrupt here)."""

    on_chunk: Callable[[int], None] | None = None
    on_step: Callable[[int], None] | None = None


@dataclass
class _Context:
    splits: Splits
    pairs: list[Pair]
    cache: CutCache
    table: FeatureTable
    parts: DecoderParts
    config: StagesConfig
    out: Path
    hooks: Hooks
    progress: bool


def _grades(pairs: Sequence[Pair]) -> NDArray[np.int64]:
    return np.asarray([p.grade for p in pairs], np.int64)


def _dev_score(metrics: dict[str, dict[str, float]]) -> float:
    """Mean macro-F1 of dev and ood_dev (the selection rule of stage 1)."""
    return float(np.mean([metrics["dev"]["macro_f1"], metrics["ood_dev"]["macro_f1"]]))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _report(
    ctx: _Context,
    logits: dict[str, NDArray[np.float32]],
    temperature: float,
    names: Sequence[str] = EVAL_SPLITS,
) -> dict[str, dict[str, float]]:
    return {n: grading_report(softmax(logits[n] / temperature), list(ctx.splits.split(n))) for n in names}


def _logits(ctx: _Context, model: TopModel, names: Sequence[str]) -> dict[str, NDArray[np.float32]]:
    c = ctx.config
    return {
        n: predict_logits(
            model,
            ctx.cache,
            ctx.table.rows(list(ctx.splits.split(n))),
            batch_size=c.eval_batch_size,
            compute_dtype=c.compute_dtype,
            device=c.device,
            progress=ctx.progress,
        )
        for n in names
    }


def _fit_dev_temperature(ctx: _Context, logits: dict[str, NDArray[np.float32]]) -> float:
    dev = [*ctx.splits.dev, *ctx.splits.ood_dev]
    return fit_temperature(np.concatenate([logits["dev"], logits["ood_dev"]]), _grades(dev))


def _stage1(ctx: _Context, seed: int, folder: Path) -> tuple[ProbeHead, list[Pair], dict[str, Any]]:
    """The probe on cached probe-layer features (graded loss + DASA as configured), temperature on dev."""
    cfg = replace(ctx.config.probe, seed=seed)
    layer = ctx.config.layer
    done = _read_json(folder / "stage1.json")
    pool = list(ctx.splits.ood_train)
    if done is not None:
        extra = [pool[i] for i in done["pool_indices"]]
        return ProbeHead.load(folder / "stage1_head.npz"), extra, done
    started = time.perf_counter()
    extra = augmentation_pairs(ctx.table, layer, ctx.splits, cfg)
    train = [*ctx.splits.train, *extra]
    head = train_probe(ctx.table.of(layer, train), _grades(train), cfg, layer=layer)
    dev = [*ctx.splits.dev, *ctx.splits.ood_dev]
    head = replace(head, temperature=fit_temperature(head.logits(ctx.table.of(layer, dev)), _grades(dev)))
    metrics = {
        n: grading_report(
            head.predict_proba(ctx.table.of(layer, list(ctx.splits.split(n)))), list(ctx.splits.split(n))
        )
        for n in EVAL_SPLITS
    }
    index = {p.key: i for i, p in enumerate(pool)}
    result = {
        "stage": "1",
        "seed": seed,
        "metrics": metrics,
        "temperature": head.temperature,
        "config": asdict(cfg),
        "augmented": len(extra),
        "pool_indices": [index[p.key] for p in extra],
        "seconds": round(time.perf_counter() - started, 1),
    }
    head.save(folder / "stage1_head.npz")
    _write_json(folder / "stage1.json", result)
    return head, extra, result


def _stage2(
    ctx: _Context, seed: int, folder: Path, head1: ProbeHead, extra: list[Pair]
) -> tuple[TopModel, dict[str, Any]]:
    c = ctx.config
    top_cfg = replace(c.top, seed=seed, compute_dtype=c.compute_dtype)
    model = TopModel(ctx.parts, c.cut, c.layer, head1, top_cfg.rank, top_cfg.lora_alpha, seed=seed)
    done = _read_json(folder / "stage2.json")
    if done is not None:
        from darl_lite.distill.staged_teacher import load_top

        loaded, _ = load_top(folder / "stage2_top.npz", ctx.parts)
        return loaded, done
    started = time.perf_counter()
    train = [*ctx.splits.train, *extra]
    outcome = train_top(
        model,
        ctx.cache,
        ctx.table.rows(train),
        _grades(train),
        top_cfg,
        folder / "checkpoints",
        device=c.device,
        on_step=ctx.hooks.on_step,
        progress=ctx.progress,
    )
    train_seconds = time.perf_counter() - started
    logits = _logits(ctx, model, EVAL_SPLITS)
    temperature = _fit_dev_temperature(ctx, logits)
    result = {
        "stage": "1+2",
        "seed": seed,
        "metrics": _report(ctx, logits, temperature),
        "temperature": temperature,
        "config": asdict(top_cfg),
        "steps": outcome.steps,
        "resumed_from": outcome.resumed_from,
        "final_loss": float(np.mean(outcome.losses[-50:])) if outcome.losses else None,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_top(
        folder / "stage2_top.npz",
        model,
        temperature,
        mix=1.0,
        compute_dtype=c.compute_dtype,
        storage_dtype=c.storage_dtype,
        max_length=c.max_length,
    )
    _write_json(folder / "stage2.json", result)
    return model, result


def _stage3(
    ctx: _Context, seed: int, folder: Path, model: TopModel, head1: ProbeHead, results: dict[str, Any]
) -> dict[str, Any]:
    """WiSE-FT: α on the grid (plus 0 = stage 1 and 1 = stage 2) by dev + ood_dev macro-F1."""
    done = _read_json(folder / "stage3.json")
    if done is not None:
        return dict(done)
    c = ctx.config
    started = time.perf_counter()
    head2 = head_arrays(model)
    curve: list[tuple[float, float]] = [(0.0, _dev_score(results["1"]["metrics"]))]
    found: dict[float, tuple[dict[str, NDArray[np.float32]], float]] = {}
    for alpha in sorted(a for a in c.alpha_grid if 0.0 < a < 1.0):
        set_interpolation(model, head1, head2, alpha)
        logits = _logits(ctx, model, ("dev", "ood_dev"))
        temperature = _fit_dev_temperature(ctx, logits)
        found[alpha] = (logits, temperature)
        curve.append((alpha, _dev_score(_report(ctx, logits, temperature, ("dev", "ood_dev")))))
    curve.append((1.0, _dev_score(results["1+2"]["metrics"])))
    best = max(curve, key=lambda point: (point[1], -abs(point[0] - 0.5)))[0]
    if best in found:
        set_interpolation(model, head1, head2, best)
        logits, temperature = found[best]
        logits.update(_logits(ctx, model, ("id_test", "ood_test")))
        metrics, mix = _report(ctx, logits, temperature), best
    else:
        source = results["1"] if best == 0.0 else results["1+2"]
        metrics, temperature, mix = source["metrics"], source["temperature"], best
        set_interpolation(model, head1, head2, best)
    save_top(
        folder / "stage3_top.npz",
        model,
        temperature,
        mix=mix,
        compute_dtype=c.compute_dtype,
        storage_dtype=c.storage_dtype,
        max_length=c.max_length,
    )
    set_interpolation(model, head1, head2, 1.0)
    result = {
        "stage": "1+2+3",
        "seed": seed,
        "alpha": best,
        "alpha_curve": curve,
        "metrics": metrics,
        "temperature": temperature,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(folder / "stage3.json", result)
    return result


def _run_seed(ctx: _Context, seed: int) -> dict[str, Any]:
    folder = ctx.out / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    head1, extra, r1 = _stage1(ctx, seed, folder)
    results: dict[str, Any] = {"1": r1}
    model, results["1+2"] = _stage2(ctx, seed, folder, head1, extra)
    results["1+2+3"] = _stage3(ctx, seed, folder, model, head1, results)
    _write_json(folder / "metrics.json", results)
    logger.info(
        "seed %d: dev score %s", seed, {k: round(_dev_score(v["metrics"]), 4) for k, v in results.items()}
    )
    return results
