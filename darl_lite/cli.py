"""``darl-lite``: the command line, one subcommand per pipeline stage.

Stages that need the training extras are imported inside their handlers, so ``darl-lite score``
and ``darl-lite inspect`` work on a runtime-only install. An unknown option is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from darl_lite.errors import DarlLiteError

logger = logging.getLogger("darl_lite.cli")


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from darl_lite.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(
        out_dir=args.out,
        fold=args.fold,
        teacher_file=args.teacher,
        epochs=args.epochs,
        max_train_pairs=args.max_train_pairs,
        max_length=args.max_length,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run_quickstart(config)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"Full report: {Path(args.out) / 'report.json'}")
    return 0


def _cmd_distill_student(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia, load_pairs
    from darl_lite.distill.backbone import load_student
    from darl_lite.distill.trainer import DistillConfig, distill_student, save_student
    from darl_lite.teacher_file import FileTeacher

    pairs = load_pairs(args.pairs) if args.pairs else list(load_dbpedia(fold=args.fold).train)
    teacher = FileTeacher.from_file(args.teacher)
    model, tokenizer = load_student(args.backbone)
    config = DistillConfig(epochs=args.epochs, max_length=args.max_length, seed=args.seed)
    result = distill_student(model, tokenizer, pairs, teacher.predict_proba(pairs), config)
    save_student(model, tokenizer, args.out)
    print(f"student trained on {len(pairs):,} pairs in {result.seconds:.0f} s, saved to {args.out}")
    return 0


def _cmd_distill_standin(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.distill.standin import make_standin_teacher
    from darl_lite.distill.trainer import DistillConfig

    config = DistillConfig(
        epochs=args.epochs, max_length=args.max_length, seed=args.seed, max_steps=args.max_steps
    )
    provenance = make_standin_teacher(load_dbpedia(fold=args.fold), args.out, config, fold=args.fold)
    print(json.dumps(provenance, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.export.build import ExportConfig, build_bundle
    from darl_lite.export.parity import ParityThresholds

    splits = load_dbpedia(fold=args.fold)
    config = ExportConfig(
        max_length=args.max_length,
        preset=args.preset,
        thresholds=ParityThresholds(min_argmax_agreement=args.min_agreement),
        allow_parity_failure=args.allow_parity_failure,
    )
    bundle = build_bundle(
        args.student,
        args.out,
        train_pairs=splits.train,
        dev_pairs=splits.dev,
        parity_pairs=[*splits.dev, *splits.ood_dev],
        config=config,
        overwrite=args.overwrite,
    )
    print(f"bundle written to {bundle.directory}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer

    if args.items == "-":
        lines = sys.stdin.read().splitlines()
    else:
        lines = Path(args.items).read_text(encoding="utf-8").splitlines()
    items = [line for line in lines if line.strip()]
    scorer = Scorer.load(
        args.bundle, precision=args.precision, session=SessionConfig(intra_op_threads=args.threads)
    )
    results = scorer.score(args.query, items)
    if args.json:
        from dataclasses import asdict

        print(json.dumps([{"item": i, **asdict(r)} for i, r in zip(items, results, strict=True)], indent=2))
        return 0
    names = scorer.grade_names
    print(f"{'expected':>8}  {'grade':<10} {'ood':>8} {'routed':<6}  item")
    for item, r in sorted(zip(items, results, strict=True), key=lambda x: -x[1].expected_relevance):
        routed = "yes" if r.routed else "no"
        print(f"{r.expected_relevance:8.3f}  {names[r.grade]:<10} {r.ood_score:8.1f} {routed:<6}  {item}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from darl_lite.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    print(json.dumps(bundle.manifest, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darl-lite",
        allow_abbrev=False,
        description="Distilled, routed relevance grading for CPU search nodes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser(
        "quickstart", allow_abbrev=False, help="run the whole pipeline on the shipped data"
    )
    quick.add_argument("--out", default="darl-lite-run", help="output folder (default: darl-lite-run)")
    quick.add_argument("--fold", type=int, default=0, choices=range(5), help="official fold (0-4)")
    quick.add_argument("--teacher", default=None, help="teacher outputs file (default: the shipped one)")
    quick.add_argument("--epochs", type=int, default=1)
    quick.add_argument("--max-train-pairs", type=int, default=None, help="subsample training pairs")
    quick.add_argument("--max-length", type=int, default=64, help="tokens per pair")
    quick.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = auto)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--no-progress", action="store_true", help="hide progress bars")
    quick.set_defaults(handler=_cmd_quickstart)

    distill = sub.add_parser("distill", allow_abbrev=False, help="distillation stage").add_subparsers(
        dest="what", required=True
    )
    student = distill.add_parser(
        "student", allow_abbrev=False, help="train the student on a teacher's outputs"
    )
    student.add_argument("--teacher", required=True, help="teacher outputs file (JSONL or Parquet)")
    student.add_argument(
        "--pairs", default=None, help="pairs file (CSV/JSONL/Parquet); default: shipped train split"
    )
    student.add_argument("--backbone", default=None, help="HF model folder (default: all-MiniLM-L6-v2)")
    student.add_argument("--out", required=True, help="folder for the trained student")
    student.add_argument("--fold", type=int, default=0, choices=range(5))
    student.add_argument("--epochs", type=int, default=1)
    student.add_argument("--max-length", type=int, default=64)
    student.add_argument("--seed", type=int, default=0)
    student.set_defaults(handler=_cmd_distill_student)
    standin = distill.add_parser(
        "standin-teacher", allow_abbrev=False, help="train the stand-in teacher and grade every shipped pair"
    )
    standin.add_argument("--out", required=True, help="teacher outputs file to write (.jsonl.gz)")
    standin.add_argument("--fold", type=int, default=0, choices=range(5))
    standin.add_argument("--epochs", type=int, default=2)
    standin.add_argument("--max-length", type=int, default=64)
    standin.add_argument("--seed", type=int, default=0)
    standin.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps")
    standin.set_defaults(handler=_cmd_distill_standin)

    export = sub.add_parser("export", allow_abbrev=False, help="export a trained student to a bundle")
    export.add_argument("student", help="saved student folder (from `darl-lite distill student`)")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.add_argument("--fold", type=int, default=0, choices=range(5))
    export.add_argument("--max-length", type=int, default=64)
    export.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "avx2", "avx512_vnni", "arm64"],
        help="int8 kernel family",
    )
    export.add_argument(
        "--min-agreement", type=float, default=0.95, help="parity gate: int8/fp32 argmax agreement"
    )
    export.add_argument(
        "--allow-parity-failure", action="store_true", help="write the bundle even if parity fails"
    )
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=_cmd_export)

    score = sub.add_parser("score", allow_abbrev=False, help="grade items against a query with a bundle")
    score.add_argument("bundle")
    score.add_argument("--query", required=True)
    score.add_argument("--items", required=True, help="file with one item per line, or - for stdin")
    score.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    score.add_argument("--threads", type=int, default=0)
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(handler=_cmd_score)

    inspect = sub.add_parser("inspect", allow_abbrev=False, help="verify a bundle and print its manifest")
    inspect.add_argument("bundle")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def _configure_logging(verbose: bool) -> None:
    """Show darl-lite's own progress messages; third-party loggers (onnxruntime's quantizer logs
    every node at INFO on the root logger) stay at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("darl_lite")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(verbose=args.verbose or args.command == "quickstart")
    try:
        return int(args.handler(args))
    except DarlLiteError as exc:
        print(f"darl-lite: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"darl-lite: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
