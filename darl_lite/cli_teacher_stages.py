"""``darl-lite distill teacher-stages``: stages 1-3 of the DaRL recipe on the teacher LLM, resumable.

Only the parser lives here, so ``darl-lite`` stays importable without torch; the handler imports
:mod:`darl_lite.distill.teacher_stages` (the ``distill`` extra) when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(distill: Any) -> None:
    """Add ``teacher-stages`` to the ``distill`` subcommands (an argparse subparsers object)."""
    cmd = distill.add_parser(
        "teacher-stages",
        allow_abbrev=False,
        help="teacher LLM: cut cache -> probe -> LoRA top blocks -> WiSE-FT, per seed; stage table; "
        "the best on dev writes the teacher file (resumable: rerun the same command)",
    )
    cmd.add_argument("--out", required=True, help="run folder (cache, per-seed results, teacher file)")
    cmd.add_argument("--model", default=None, help="LLM folder (default: the fetch-teacher cache)")
    cmd.add_argument("--cache-dir", default=None, help="cut cache folder (default: OUT/cache)")
    cmd.add_argument("--fold", type=int, default=0, choices=range(5))
    cmd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmd.add_argument("--cut", type=int, default=16, help="first tuned block (0 = the whole network)")
    cmd.add_argument("--layer", type=int, default=18, help="hidden_states index the probe head reads")
    cmd.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    cmd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    cmd.add_argument("--storage-dtype", default="float16", choices=["float16", "float32"])
    cmd.add_argument("--epochs", type=int, default=1, help="stage-2 epochs")
    cmd.add_argument("--max-steps", type=int, default=None, help="cap on stage-2 optimiser steps")
    cmd.add_argument("--batch-size", type=int, default=32, help="stage-2 batch size")
    cmd.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    cmd.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate")
    cmd.add_argument("--rank", type=int, default=8, help="LoRA rank")
    cmd.add_argument("--loss", default="graded", choices=["ce", "graded"])
    cmd.add_argument("--alpha-grid", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    cmd.add_argument("--checkpoint-every", type=int, default=50, help="stage-2 steps between checkpoints")
    cmd.add_argument(
        "--augment-budget", type=int, default=2000, help="DASA pool pairs added in stage 1 and 2"
    )
    cmd.add_argument(
        "--max-pairs",
        nargs="+",
        default=[],
        metavar="SPLIT=N",
        help="time-boxed run: keep whole queries of SPLIT up to about N pairs (no teacher file is written)",
    )
    cmd.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    cmd.add_argument("--no-ablation", action="store_true", help="skip the stage-1 loss/selection ablation")
    cmd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cmd.set_defaults(handler=_cmd_teacher_stages)


def _cmd_teacher_stages(args: argparse.Namespace) -> int:
    import torch

    from darl_lite.datasets import load_dbpedia
    from darl_lite.distill.llm_teacher import ProbeConfig
    from darl_lite.distill.teacher_fetch import default_cache_dir
    from darl_lite.distill.teacher_stages import StagesConfig, run_teacher_stages
    from darl_lite.distill.top_tune import TopConfig

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = StagesConfig(
        seeds=tuple(args.seeds),
        cut=args.cut,
        layer=args.layer,
        compute_dtype=args.dtype,
        storage_dtype=args.storage_dtype,
        device=args.device,
        alpha_grid=tuple(args.alpha_grid),
        probe=ProbeConfig(loss=args.loss, augment_budget=args.augment_budget),
        max_pairs=_max_pairs(args.max_pairs),
        top=TopConfig(
            rank=args.rank,
            lr=args.lr,
            head_lr=args.head_lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            loss=args.loss,
            checkpoint_every=args.checkpoint_every,
        ),
    )
    splits = load_dbpedia(fold=args.fold)
    run = run_teacher_stages(
        splits,
        args.model or default_cache_dir(),
        args.out,
        config,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        ablation=not args.no_ablation,
    )
    print((run.out_dir / "stage_table.md").read_text(encoding="utf-8"))
    print(f"chosen on dev + ood_dev: seed {run.chosen[0]}, stage {run.chosen[1]}")
    if run.teacher_file is not None:
        print(f"teacher file: {run.teacher_file}\ntop blocks + head: {run.top_file}")
    return 0


def _max_pairs(tokens: list[str]) -> tuple[tuple[str, int], ...]:
    from darl_lite.errors import InputError

    out = []
    for token in tokens:
        name, _, n = token.partition("=")
        if not n.isdigit():
            raise InputError(f"--max-pairs takes SPLIT=N (e.g. train=2400); got {token!r}")
        out.append((name, int(n)))
    return tuple(out)


__all__ = ["register"]
