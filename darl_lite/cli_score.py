"""``darl-lite score`` and ``darl-lite inspect``: the runtime commands (no training extras needed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from darl_lite.cli_fallback import add_fallback_arguments
from darl_lite.errors import DataError


def register(sub: Any) -> None:
    score = sub.add_parser("score", allow_abbrev=False, help="grade items against a query with a bundle")
    score.add_argument("bundle")
    score.add_argument("--query", required=True)
    score.add_argument("--items", required=True, help="file with one item per line, or - for stdin")
    score.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    score.add_argument("--threads", type=int, default=0)
    score.add_argument(
        "--no-spinning",
        action="store_true",
        help="onnxruntime's threads sleep between ops instead of spinning (for a node that shares its cores)",
    )
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_fallback_arguments(score)
    score.set_defaults(handler=_cmd_score)

    inspect = sub.add_parser("inspect", allow_abbrev=False, help="verify a bundle and print its manifest")
    inspect.add_argument("bundle")
    inspect.set_defaults(handler=_cmd_inspect)


def _cmd_score(args: argparse.Namespace) -> int:
    from darl_lite.cli_fallback import routing_summary, scorer_from_args

    items = _read_items(args.items)
    with scorer_from_args(args) as scorer:
        results = scorer.score(args.query, items)
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
