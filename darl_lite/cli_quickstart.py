"""``darl-lite quickstart``: the whole pipeline on the shipped data (needs the distill and export extras)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from darl_lite.cli_options import add_fold_option


def register(sub: Any) -> None:
    quick = sub.add_parser(
        "quickstart", allow_abbrev=False, help="run the whole pipeline on the shipped data"
    )
    quick.add_argument("--out", default="darl-lite-run", help="output folder (default: darl-lite-run)")
    add_fold_option(quick)
    quick.add_argument("--teacher", default=None, help="teacher outputs file (default: the shipped one)")
    quick.add_argument("--epochs", type=int, default=1)
    quick.add_argument("--max-train-pairs", type=int, default=None, help="subsample training pairs")
    quick.add_argument("--max-length", type=int, default=64, help="tokens per pair")
    quick.add_argument(
        "--no-pool",
        action="store_true",
        help="distil on train only, not also on the teacher-graded ood_train pool",
    )
    quick.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = auto)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--no-progress", action="store_true", help="hide progress bars")
    quick.set_defaults(handler=_cmd_quickstart)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from darl_lite.pipeline.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(
        out_dir=args.out,
        fold=args.fold,
        teacher_file=args.teacher,
        epochs=args.epochs,
        max_train_pairs=args.max_train_pairs,
        distil_pool=not args.no_pool,
        max_length=args.max_length,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run_quickstart(config)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"Full report: {Path(args.out) / 'report.json'}")
    return 0
