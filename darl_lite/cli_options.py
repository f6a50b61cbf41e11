"""Options several ``darl-lite`` subcommands share, defined once (torch-free, cheap to import)."""

from __future__ import annotations

import argparse

from darl_lite.datasets import N_FOLDS


def add_fold_option(parser: argparse.ArgumentParser) -> None:
    """``--fold``: which official DBpedia-Entity fold splits the shipped data (default 0)."""
    parser.add_argument(
        "--fold",
        type=int,
        default=0,
        choices=range(N_FOLDS),
        help=f"official fold of the shipped data (0-{N_FOLDS - 1}; default: 0)",
    )


__all__ = ["add_fold_option"]
