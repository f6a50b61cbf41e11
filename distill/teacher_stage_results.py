"""The stage table across seeds, the choice on dev + ood_dev, the chosen teacher's grades and provenance."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from darl_lite.distill.llm_features import TEACHER_TEMPLATE
from darl_lite.distill.llm_teacher import (
    ProbeHead,
)
from darl_lite.distill.staged_teacher import TEACHER_NAME, save_top, softmax
from darl_lite.distill.teacher_provenance import run_record, teacher_identity
from darl_lite.distill.teacher_stage_config import EVAL_SPLITS, STAGES
from darl_lite.distill.teacher_stage_runs import _Context, _dev_score
from darl_lite.distill.top_tune import (
    TopModel,
    predict_logits,
    set_interpolation,
)

logger = logging.getLogger("darl_lite.distill.teacher_stages")


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
        **teacher_identity(TEACHER_NAME, model_sha, top_file),
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
        **run_record(),
    }
