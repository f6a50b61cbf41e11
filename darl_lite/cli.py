"""``darl-lite``: the command line, one subcommand per pipeline stage, each in its own module.

Stages that need the training extras are imported inside their handlers, so ``darl-lite score``
and ``darl-lite inspect`` work on a runtime-only install. An unknown option is an error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from darl_lite import (
    cli_distill,
    cli_export,
    cli_quickstart,
    cli_refit,
    cli_route_curve,
    cli_score,
    cli_serve,
)
from darl_lite.errors import DarlLiteError

logger = logging.getLogger("darl_lite.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darl-lite",
        allow_abbrev=False,
        description="Distilled, routed relevance grading for CPU search nodes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_quickstart.register(sub)
    cli_distill.register(sub)
    cli_export.register(sub)
    cli_score.register(sub)  # score, inspect
    cli_route_curve.register(sub)
    cli_refit.register(sub)
    cli_serve.register(sub)
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
