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

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite.datasets import SPLIT_NAMES, Splits
from darl_lite.distill.backbone import local_model_dir, weights_sha256
from darl_lite.distill.cut_cache import cache_cut_states
from darl_lite.distill.decoder_blocks import DecoderParts
from darl_lite.distill.llm_features import distinct_pairs
from darl_lite.distill.llm_teacher import (
    FeatureTable,
)
from darl_lite.distill.teacher_stage_config import EVAL_SPLITS, STAGES, StagesConfig
from darl_lite.distill.teacher_stage_results import _provenance, _teacher_probs, choose, stage_table
from darl_lite.distill.teacher_stage_runs import Hooks, _Context, _dev_score, _run_seed, _write_json
from darl_lite.errors import DarlLiteError, InputError
from darl_lite.metrics import grading_report
from darl_lite.teacher_file import write_teacher_outputs
from darl_lite.types import Pair

logger = logging.getLogger(__name__)


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
    ctx = _context(splits, folder, model_sha, out, c, cache_dir, hooks, progress)
    per_seed = {seed: _run_seed(ctx, seed) for seed in c.seeds}
    table, (seed, stage) = _write_table(ctx, per_seed)
    teacher_file = top_file = None
    if write_teacher:
        teacher_file, top_file = _write_teacher(ctx, per_seed, seed, stage, table, model_sha, started)
    if ablation:
        from darl_lite.distill.teacher_ablation import run_ablation

        run_ablation(ctx.table, ctx.splits, c.layer, c.seeds, c.probe, out)
    return StagesRun(out, per_seed, table, (seed, stage), teacher_file, top_file)


def _context(
    splits: Splits,
    folder: Path,
    model_sha: str,
    out: Path,
    c: StagesConfig,
    cache_dir: str | os.PathLike[str] | None,
    hooks: Hooks,
    progress: bool,
) -> _Context:
    """Load the LLM, fill (or resume) the cut cache, and bundle what every stage reads."""
    from darl_lite.distill.teacher_tune import load_llm

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
    table = FeatureTable.build({c.layer: cache.probe}, pairs)
    return _Context(splits, pairs, cache, table, DecoderParts.of(model), c, out, hooks, progress)


def _write_table(
    ctx: _Context, per_seed: dict[int, dict[str, Any]]
) -> tuple[dict[str, Any], tuple[int, str]]:
    """``stage_table.md`` (with the shipped teacher's row) and ``stages.json``; the chosen seed/stage."""
    table, markdown = stage_table(per_seed)
    shipped = shipped_metrics(ctx.splits)
    if shipped is not None:
        cells = [f"{shipped[n][m]:.3f}" for n in EVAL_SPLITS for m in ("macro_f1", "ndcg@10", "ece")]
        markdown += "| shipped teacher (stage 1, fp32) | " + " | ".join(cells) + " | - |\n"
    (ctx.out / "stage_table.md").write_text(markdown, encoding="utf-8")
    seed, stage = choose(per_seed)
    summary = {
        "config": asdict(ctx.config),
        "sizes": ctx.splits.sizes,
        "shipped_teacher": shipped,
        "table": table,
        "chosen": {"seed": seed, "stage": stage},
        "dev_scores": {
            f"{s}/{k}": round(_dev_score(r[k]["metrics"]), 4) for s, r in per_seed.items() for k in STAGES
        },
    }
    _write_json(ctx.out / "stages.json", summary)
    return table, (seed, stage)


def _write_teacher(
    ctx: _Context,
    per_seed: dict[int, dict[str, Any]],
    seed: int,
    stage: str,
    table: dict[str, Any],
    model_sha: str,
    started: float,
) -> tuple[Path, Path]:
    """The chosen teacher's grades of every pair as a teacher file, its top file and provenance."""
    probs, top_file = _teacher_probs(ctx, seed, stage)
    provenance = _provenance(ctx, seed, stage, per_seed[seed][stage], top_file, model_sha, started, table)
    shipped_top = ctx.out / "teacher_llm_top.npz"
    shipped_top.write_bytes(top_file.read_bytes())
    provenance["head"] = shipped_top.name
    teacher_file = write_teacher_outputs(ctx.out / "teacher_llm.jsonl.gz", ctx.pairs, probs, provenance)
    return teacher_file, shipped_top
