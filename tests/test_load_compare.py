"""bench.load_compare's summary: medians over rounds per case and contender, and the ratio table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.load_compare import markdown, summarise
from bench.load_server import CONCURRENCY, SIZES


def _round(scale: float) -> list[dict[str, object]]:
    return [
        {"items": n, "concurrency": c, "pairs_per_s": scale * n * c, "p99_ms": 10.0 / scale}
        for n in SIZES
        for c in CONCURRENCY
    ]


def test_medians_over_rounds_and_ratio_to_the_peer() -> None:
    rounds = {
        "darl-lite serve": [_round(2.0), _round(3.0), _round(100.0)],  # an outlier round: the median holds
        "ST int8 peer": [_round(1.0), _round(1.0), _round(1.5)],
    }
    summary = summarise(rounds)
    case = next(c for c in summary["cases"] if (c["items"], c["concurrency"]) == (10, 4))
    assert case["darl-lite serve"]["pairs_per_s"] == pytest.approx(3.0 * 40)
    assert case["ST int8 peer"]["pairs_per_s"] == pytest.approx(40)
    assert case["darl-lite serve"]["pairs_per_s_rounds"] == [80, 120, 4000]
    table = markdown(summary)
    assert "| 10 | 4 | 120 (3) | 40 (10) | 3.00× |" in table
    assert len(table.splitlines()) == 2 + len(SIZES) * len(CONCURRENCY)
