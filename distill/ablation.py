"""The DaRL recipe ablation on the shipped data: one command, same backbone and step budget per arm.

Arms (each from a fresh student: same backbone, same seed, same number of stage-2 optimiser steps)::

    ce-single            plain loss (KL to the teacher + CE), fine-tune only        — the baseline
    graded-single        graded loss, fine-tune only                                — loss effect
    graded-multi         graded loss, probe → fine-tune → WiSE-FT                   — stages effect
    graded-multi-random  graded-multi + random pool samples (``--augment-budget``)  — augmentation control
    graded-multi-dasa    graded-multi + DASA pool samples of the same number        — DASA effect

The pool is the ``ood_train`` split (out-of-distribution queries withheld from training); its human
grades are read only for the selected pairs (``--labeler human``, default) — or the teacher labels
them (``--labeler teacher``). Dev sets for WiSE-FT's alpha: ``dev`` and ``ood_dev``. Test metrics
(macro-F1, NDCG@10, ECE) on ``id_test`` and ``ood_test`` go to ``OUT/ablation.json`` and a markdown
table with the per-factor differences to ``OUT/ablation.md``.

Usage::

    python -m darl_lite.distill.ablation --out ablation-run            # full data, all arms
    python -m darl_lite.distill.ablation --out smoke --smoke           # ~200 pairs, minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from darl_lite.errors import InputError
from darl_lite.types import Pair

if TYPE_CHECKING:
    from darl_lite.distill.recipe import RecipeConfig

logger = logging.getLogger(__name__)

#: arm name -> (loss, stages, augmentation)
ARMS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "ce-single": ("ce", ("finetune",), None),
    "graded-single": ("graded", ("finetune",), None),
    "graded-multi": ("graded", ("probe", "finetune", "interpolate"), None),
    "graded-multi-random": ("graded", ("probe", "finetune", "interpolate"), "random"),
    "graded-multi-dasa": ("graded", ("probe", "finetune", "interpolate"), "dasa"),
}
#: (label, arm, reference arm) for the differences table.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("graded loss vs plain CE", "graded-single", "ce-single"),
    ("multi-stage vs single-stage", "graded-multi", "graded-single"),
    ("random augmentation vs none", "graded-multi-random", "graded-multi"),
    ("DASA vs none", "graded-multi-dasa", "graded-multi"),
    ("DASA vs random (equal size)", "graded-multi-dasa", "graded-multi-random"),
)
TEST_METRICS: tuple[str, ...] = ("macro_f1", "ndcg@10", "ece")


def _subsample_queries(pairs: Sequence[Pair], max_pairs: int | None, seed: int) -> list[Pair]:
    """Whole queries, in seeded order, until ``max_pairs`` is reached (NDCG needs complete queries)."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs)
    by_query: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_query.setdefault(str(pair.query_id or pair.query), []).append(pair)
    out: list[Pair] = []
    for key in np.random.default_rng(seed).permutation(sorted(by_query)).tolist():
        if out and len(out) + len(by_query[key]) > max_pairs:
            continue
        out.extend(by_query[key])
        if len(out) >= max_pairs:
            break
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m darl_lite.distill.ablation", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output folder (ablation.json, ablation.md)")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--teacher-file", default=None, help="teacher outputs (default: the shipped file)")
    p.add_argument("--backbone", default=None, help="local student folder (default: packaged MiniLM-L6)")
    p.add_argument("--labeler", choices=("human", "teacher"), default="human")
    p.add_argument("--augment-budget", type=int, default=2000)
    p.add_argument("--per-query-cap", type=int, default=None, help="default: 2 × budget / pool queries")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--alpha-grid", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--max-train-pairs", type=int, default=None)
    p.add_argument("--max-dev-pairs", type=int, default=2000, help="per dev set, whole queries")
    p.add_argument("--max-test-pairs", type=int, default=None, help="per test set, whole queries")
    p.add_argument("--max-pool-pairs", type=int, default=None, help="subsample the pool (whole queries)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank for stage 2 (default: full fine-tune)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="200 train pairs, ~100 per dev/test set, pool ~1000, budget 50"
    )
    return p


def _markdown(report: dict[str, Any]) -> str:
    arms: dict[str, Any] = report["arms"]
    head = (
        "| arm | "
        + " | ".join(f"{s} {m}" for s in ("id", "ood") for m in TEST_METRICS)
        + " | α | steps | s |"
    )
    lines = [head, "|" + "---|" * (len(TEST_METRICS) * 2 + 4)]
    for name, arm in arms.items():
        cells = [f"{arm['test'][s][m]:.4f}" for s in ("id_test", "ood_test") for m in TEST_METRICS]
        alpha = arm["summary"]["alpha"]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {'-' if alpha is None else alpha} | {arm['summary']['steps'].get('finetune', 0)}"
            + f" | {arm['seconds']:.0f} |"
        )
    lines += ["", "Differences (arm − reference; ECE: lower is better):", ""]
    lines += [
        "| comparison | " + " | ".join(f"Δ {s} {m}" for s in ("id", "ood") for m in TEST_METRICS) + " |"
    ]
    lines.append("|" + "---|" * (len(TEST_METRICS) * 2 + 1))
    for label, arm, ref in COMPARISONS:
        if arm in arms and ref in arms:
            deltas = [
                arms[arm]["test"][s][m] - arms[ref]["test"][s][m]
                for s in ("id_test", "ood_test")
                for m in TEST_METRICS
            ]
            lines.append(f"| {label} | " + " | ".join(f"{d:+.4f}" for d in deltas) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected arms and write ``ablation.json`` and ``ablation.md``; returns the report."""
    args = _parser().parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.smoke:
        _apply_smoke(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(args)
    base, steps = _base_config(args, data)
    report: dict[str, Any] = {
        "command": "python -m darl_lite.distill.ablation "
        + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "teacher": {
            "name": data.teacher.name,
            "kind": data.teacher.kind,
            "file": args.teacher_file or "shipped",
        },
        "sizes": {
            "train": len(data.train),
            "pool": len(data.pool),
            "augment_budget": base.augment_budget,
            "per_query_cap": base.per_query_cap,
            **{k: len(v) for k, v in {**data.dev_sets, **data.test_sets}.items()},
        },
        "finetune_steps_per_arm": steps,
        "config": {k: v for k, v in asdict(base).items() if k != "lora"} | {"lora_r": args.lora_r},
        "arms": {},
    }
    for name in args.arms:
        report["arms"][name] = _run_arm(name, args, base, data)
        (out / "ablation.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "ablation.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _apply_smoke(args: argparse.Namespace) -> None:
    """``--smoke``: small sizes wherever the command line left the default."""
    args.max_train_pairs = args.max_train_pairs or 200
    args.max_dev_pairs = min(args.max_dev_pairs, 100)
    args.max_test_pairs = args.max_test_pairs or 100
    args.augment_budget = min(args.augment_budget, 50)
    args.max_pool_pairs = args.max_pool_pairs or 1000


@dataclass(frozen=True)
class _Data:
    """The ablation's pairs: train (with the teacher's probabilities), dev, test and the pool."""

    teacher: Any
    train: list[Pair]
    teacher_probs: np.ndarray
    dev_sets: dict[str, list[Pair]]
    test_sets: dict[str, list[Pair]]
    pool: list[Pair]


def _load_data(args: argparse.Namespace) -> _Data:
    """The shipped fold's splits, subsampled as the options ask (seeded; whole queries where it matters)."""
    from darl_lite.datasets import load_dbpedia
    from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

    splits = load_dbpedia(fold=args.fold)
    teacher = FileTeacher.from_file(args.teacher_file or shipped_teacher_path())
    train = list(splits.train)
    if args.max_train_pairs is not None and args.max_train_pairs < len(train):
        rng = np.random.default_rng(args.seed)
        train = [train[i] for i in sorted(rng.choice(len(train), args.max_train_pairs, replace=False))]
    dev_sets = {
        "dev": _subsample_queries(splits.dev, args.max_dev_pairs, args.seed),
        "ood_dev": _subsample_queries(splits.ood_dev, args.max_dev_pairs, args.seed),
    }
    test_sets = {
        "id_test": _subsample_queries(splits.id_test, args.max_test_pairs, args.seed),
        "ood_test": _subsample_queries(splits.ood_test, args.max_test_pairs, args.seed),
    }
    pool = _subsample_queries(splits.ood_train, args.max_pool_pairs, args.seed)
    return _Data(teacher, train, teacher.predict_proba(train), dev_sets, test_sets, pool)


def _base_config(args: argparse.Namespace, data: _Data) -> tuple[RecipeConfig, int]:
    """The config every arm starts from, and the stage-2 steps each takes (the equal budget)."""
    from darl_lite.distill.recipe import RecipeConfig
    from darl_lite.distill.stages import LoraSettings

    pool_queries = len({p.query_id for p in data.pool})
    budget = min(args.augment_budget, len(data.pool))
    cap = args.per_query_cap or max(1, math.ceil(2 * budget / max(pool_queries, 1)))
    if budget < 1 and any(ARMS[a][2] for a in args.arms):
        raise InputError("--augment-budget must be >= 1 for the augmentation arms")
    # Equal budget: every arm takes the optimiser steps of `epochs` passes over train + augmentation.
    steps = args.epochs * math.ceil((len(data.train) + budget) / args.batch_size)
    base = RecipeConfig(
        epochs=args.epochs + 1,  # enough passes for the arms without augmentation to reach `steps`
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        finetune_max_steps=steps,
        alpha_grid=tuple(args.alpha_grid),
        augment_budget=budget,
        per_query_cap=cap,
        lora=None if args.lora_r is None else LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
        seed=args.seed,
    )
    return base, steps


def _run_arm(name: str, args: argparse.Namespace, base: RecipeConfig, data: _Data) -> dict[str, Any]:
    """One arm from a fresh student: the recipe, then the test metrics; its entry in the report."""
    from darl_lite.distill.backbone import load_student
    from darl_lite.distill.dasa import human_labeler
    from darl_lite.distill.recipe import run_recipe
    from darl_lite.distill.trainer import predict_logits
    from darl_lite.metrics import grading_report
    from darl_lite.scorer import softmax

    def labeler(chosen: Sequence[Pair]) -> np.ndarray:
        return human_labeler(chosen) if args.labeler == "human" else data.teacher.predict_proba(list(chosen))

    loss, stages, augmentation = ARMS[name]
    logger.info("arm %s: loss=%s stages=%s augmentation=%s", name, loss, stages, augmentation)
    started = time.perf_counter()
    model, tokenizer = load_student(args.backbone, max_length=args.max_length, seed=args.seed)
    if args.device:
        model.to(args.device)
    result = run_recipe(
        model,
        tokenizer,
        data.train,
        data.dev_sets,
        config=replace(base, loss=loss, stages=stages),
        teacher_probs=data.teacher_probs,
        augmentation=augmentation,
        pool=data.pool,
        labeler=labeler,
        progress=True,
    )
    test = {
        split: grading_report(
            softmax(predict_logits(result.model, tokenizer, pairs, max_length=args.max_length)), pairs
        )
        for split, pairs in data.test_sets.items()
    }
    seconds = time.perf_counter() - started
    logger.info("arm %s done in %.0f s: %s", name, seconds, json.dumps(test))
    return {"summary": result.summary(), "test": test, "seconds": seconds}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
