"""``darl-lite route-curve``: quality against route rate on a shipped split, or on mixed traffic."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _parse_fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {text!r}")
    return values


def register(sub: Any) -> None:
    curve = sub.add_parser(
        "route-curve",
        allow_abbrev=False,
        help="quality vs route rate: the router against random routing at equal rates",
        description="Per split: quality when the most urgent pairs go to the teacher, against random "
        "routing at equal rates. With --mixed: streams of in-distribution and shifted requests under a "
        "budget, every contender (student, teacher, random, uncertainty router, cascade).",
    )
    curve.add_argument("bundle")
    curve.add_argument("--teacher", default=None, help="teacher outputs file (default: the shipped one)")
    curve.add_argument("--split", default="ood_test", choices=["ood_test", "id_test", "dev", "ood_dev"])
    curve.add_argument(
        "--rates", type=_parse_fractions, default=[0.0, 0.05, 0.1, 0.2], help="e.g. 0,0.05,0.1,0.2"
    )
    curve.add_argument(
        "--rule",
        default=None,
        choices=["expected_error", "threshold_excess"],
        help="rank pairs by this policy's urgency, argmax grades (default: as the node routes pairs "
        "one by one: the shift routing's corrected margin and decisions, where the bundle has them)",
    )
    curve.add_argument("--mixed", action="store_true", help="evaluate mixed streams instead of one split")
    curve.add_argument(
        "--mixed-splits",
        default="id_test,ood_test",
        help="in-distribution,shifted splits (default id_test,ood_test)",
    )
    curve.add_argument(
        "--shares", type=_parse_fractions, default=[0.1, 0.3], help="shifted shares s, e.g. 0.1,0.3"
    )
    curve.add_argument("--budgets", type=_parse_fractions, default=[0.05, 0.1, 0.2], help="budgets B")
    curve.add_argument(  # mixed_stream.DEFAULT_DRAWS (not imported here: the CLI loads stages lazily)
        "--draws", type=int, default=20, help="streams drawn per share and budget (default 20)"
    )
    curve.add_argument(
        "--cold-start",
        action="store_true",
        help="with --mixed: measure a node that just started (empty budget window) instead of the "
        "steady state (each stream preceded by another draw of the same traffic)",
    )
    curve.add_argument("--fold", type=int, default=0, choices=range(5))
    curve.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    curve.add_argument("--threads", type=int, default=0)
    curve.add_argument("--repeats", type=int, default=10, help="random draws averaged (default 10)")
    curve.add_argument("--seed", type=int, default=0)
    curve.add_argument("--json", action="store_true", help="print JSON instead of a table")
    curve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from darl_lite.datasets import load_dbpedia
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer
    from darl_lite.teacher_file import FileTeacher, shipped_teacher_path

    splits = load_dbpedia(fold=args.fold)
    teacher = FileTeacher.from_file(args.teacher or shipped_teacher_path())
    scorer = Scorer.load(
        args.bundle, precision=args.precision, session=SessionConfig(intra_op_threads=args.threads)
    )
    if args.rule:
        from darl_lite.routing import RoutingPolicy

        scorer.routing = RoutingPolicy.from_manifest(scorer.bundle.manifest, args.precision, rule=args.rule)
    if args.mixed:
        return _mixed(args, splits, teacher, scorer)
    return _single(args, splits, teacher, scorer)


def _mixed(args: argparse.Namespace, splits: Any, teacher: Any, scorer: Any) -> int:
    from darl_lite.errors import InputError
    from darl_lite.mixed_stream import detection_line, mixed_report, mixed_table

    names = [s.strip() for s in args.mixed_splits.split(",")]
    if len(names) != 2:
        raise InputError(
            f"--mixed-splits takes two splits (in-distribution,shifted), got {args.mixed_splits!r}"
        )
    id_pairs, shifted = list(splits.split(names[0])), list(splits.split(names[1]))
    report = mixed_report(
        scorer,
        id_pairs,
        shifted,
        teacher.predict_proba(id_pairs),
        teacher.predict_proba(shifted),
        shares=args.shares,
        budgets=args.budgets,
        draws=args.draws,
        seed=args.seed,
        warm_up=not args.cold_start,
    )
    if args.json:
        print(json.dumps({"splits": names, **report}, indent=2))
        return 0
    print(f"{names[0]} (in-distribution) + {names[1]} (shifted)")
    print(detection_line(report["detection"]))
    print("\n".join(mixed_table(report["streams"])))
    return 0


def _single(args: argparse.Namespace, splits: Any, teacher: Any, scorer: Any) -> int:
    import numpy as np

    from darl_lite.metrics import grading_report
    from darl_lite.route_curve import curve_table, node_route_curve

    pairs = list(splits.split(args.split))
    queries = [p.query for p in pairs]
    scored = scorer.score_arrays(queries, [p.item for p in pairs])
    grades = np.asarray([p.grade for p in pairs])
    query_ids = [p.query_id or p.query for p in pairs]
    teacher_probs = teacher.predict_proba(pairs)
    # --rule names a policy: its urgency alone, as before the shift routing; otherwise the node's own
    shift = None if args.rule else scorer.shift
    rule = (
        "corrected margin"
        if shift is not None and shift.pair_margin_threshold is not None
        else scorer.routing.rule
    )
    rows = node_route_curve(
        scored.logits,
        scored.ood_scores,
        teacher_probs,
        grades,
        queries,
        temperature=scorer.temperature,
        policy=scorer.routing,
        shift=shift,
        query_ids=query_ids,
        rates=args.rates,
        seed=args.seed,
        gains=scorer.bundle.grade_gains,
        random_repeats=args.repeats,
    )
    full = grading_report(teacher_probs, grades, query_ids, gains=scorer.bundle.grade_gains)
    if args.json:
        print(json.dumps({"split": args.split, "rule": rule, "teacher": full, "curve": rows}, indent=2))
        return 0
    print(
        f"{args.split}: {len(pairs):,} pairs, rule {rule!r}, "
        f"random = mean of {args.repeats} draws; teacher alone: macro-F1 {full['macro_f1']:.3f}, "
        f"NDCG@10 {full['ndcg@10']:.3f}"
    )
    print("\n".join(curve_table(rows)))
    return 0
