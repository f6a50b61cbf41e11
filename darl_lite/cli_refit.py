"""``darl-lite refit-routing``: fit a bundle's routing to a user's own graded traffic."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any


def register(sub: Any) -> None:
    refit = sub.add_parser(
        "refit-routing",
        allow_abbrev=False,
        help="refit the routing to your own graded pairs (and the teacher's grades) into a new bundle",
        description="Takes a few hundred of your graded pairs (CSV, JSONL or Parquet: query, item, grade) "
        "and the teacher's grades for them (a teacher file: query, item, probs), measures where the "
        "teacher beats the student on your traffic, and writes a new, re-hashed bundle that routes your "
        "kind of query only where it pays. Prints the gain curve it saw.",
    )
    refit.add_argument("bundle", help="the bundle to start from")
    refit.add_argument("--pairs", required=True, help="your graded pairs")
    refit.add_argument("--teacher", required=True, help="the teacher's grades for those pairs (teacher file)")
    refit.add_argument("--out", required=True, help="folder of the new bundle")
    refit.add_argument("--name", default="user traffic", help="name of this kind of traffic in the bundle")
    refit.add_argument(
        "--queries", default=None, help="optional file of unlabeled queries of yours, one per line"
    )
    refit.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    refit.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    refit.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from darl_lite.datasets import load_pairs
    from darl_lite.refit import refit_routing
    from darl_lite.route_curve import curve_table
    from darl_lite.teacher_file import FileTeacher

    pairs = load_pairs(args.pairs)
    teacher = FileTeacher.from_file(args.teacher)
    unlabeled: list[str] = []
    if args.queries:
        unlabeled = [
            line.strip()
            for line in Path(args.queries).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    report = refit_routing(
        args.bundle,
        pairs,
        teacher.predict_proba(pairs),
        args.out,
        kind_name=args.name,
        unlabeled_queries=unlabeled,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    ev = report.kind["evidence"]
    print(f"new bundle: {report.bundle_dir}")
    print(f"kind {report.kind['name']!r}: {ev['decision']}")
    print(
        f"  on your {ev.get('pairs', 0):,} pairs of {ev.get('assigned_queries', 0)} queries, teacher minus "
        f"student: NDCG@10 {ev.get('ndcg_gain', float('nan')):+.3f} (90% interval "
        f"{ev.get('ndcg_gain_ci90')}), macro-F1 {ev.get('macro_f1_gain', float('nan')):+.3f} (90% interval "
        f"{ev.get('macro_f1_gain_ci90')}); "
        f"student prior correction {report.kind['logit_bias']}"
    )
    print("per-pair routing on your pairs (router vs random at equal rates):")
    print("\n".join(curve_table(report.curve)))
    return 0
