"""Benchmark fixtures: the bundle under test and real pairs from the shipped data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from darl_lite.datasets import load_dbpedia
from darl_lite.types import Pair


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    """The bundle to measure: $DARL_LITE_BUNDLE, or the quickstart's (run `darl-lite quickstart` first)."""
    path = Path(os.environ.get("DARL_LITE_BUNDLE", "darl-lite-run/bundle"))
    if not (path / "manifest.json").is_file():
        pytest.skip(f"no bundle at {path}: run `darl-lite quickstart` or set DARL_LITE_BUNDLE")
    return path


@pytest.fixture(scope="session")
def query_items() -> dict[int, tuple[str, list[str]]]:
    """For each size, one real test query with that many real items (cycled where it has fewer)."""
    pairs: list[Pair] = list(load_dbpedia(fold=0).id_test)
    query = pairs[0].query
    items = [p.item for p in pairs]
    return {n: (query, [items[i % len(items)] for i in range(n)]) for n in (1, 10, 100)}
