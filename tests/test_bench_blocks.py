"""Latency cases timed in blocks that take turns (bench/conftest.py), pooled by the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.common import CONTENDERS
from bench.report import block_ratios, latency_rows, pooled_cases

ROOT = Path(__file__).resolve().parents[1]


def _collected(blocks: int) -> list[str]:
    """The latency suite's case ids in the order pytest will run them."""
    env = os.environ | {"DARL_BENCH_BLOCKS": str(blocks), "DARL_BENCH_SIZES": "1,10"}
    env["DARL_BENCH_THREADS"] = "1"
    command = [sys.executable, "-m", "pytest", "bench/test_latency.py", "--collect-only", "-q"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return [line for line in done.stdout.splitlines() if line.startswith("bench/test_latency.py::")]


def _contender(case_id: str) -> str:
    return case_id.rsplit("-", 1)[1].rstrip("]")  # test_latency[t1-n1-b0-darl_int8]


def test_blocks_take_turns_and_each_contender_leads_one() -> None:
    ids = _collected(blocks=3)
    names = list(CONTENDERS)
    assert len(ids) == 2 * 3 * len(names)  # sizes x blocks x contenders, nothing lost
    turns = [ids[k : k + len(names)] for k in range(0, len(ids), len(names))]
    for turn_index, turn in enumerate(turns):
        size, block = (1, 10)[turn_index // 3], turn_index % 3
        assert all(f"n{size}" in i and f"b{block}" in i for i in turn)  # one size, one block a turn
        order = [_contender(i) for i in turn]
        assert order == names[block:] + names[:block]  # the listed order, rotated by the block


def test_one_block_keeps_the_listed_order() -> None:
    ids = _collected(blocks=1)
    names = list(CONTENDERS)
    assert [_contender(i) for i in ids] == names + names


def _case(contender: str, block: int, seconds: list[float]) -> dict:
    return {
        "extra_info": {"contender": contender, "pairs": 1, "threads": 1, "block": block},
        "stats": {"data": seconds, "median": float(np.median(seconds))},
    }


def test_the_report_pools_blocks_and_pairs_them(tmp_path: Path) -> None:
    benchmarks = [
        _case("darl_int8", 0, [0.010, 0.011, 0.012]),
        _case("st_onnx_int8", 0, [0.020, 0.021, 0.022]),
        _case("darl_int8", 1, [0.030, 0.031, 0.032]),  # a slow phase of the host...
        _case("st_onnx_int8", 1, [0.045, 0.046, 0.047]),  # ...that slowed both
    ]
    (tmp_path / "latency_t1.json").write_text(json.dumps({"benchmarks": benchmarks}))
    cases = pooled_cases(tmp_path)
    darl = cases[("darl_int8", 1, 1)]
    assert darl["data"].tolist() == [0.010, 0.011, 0.012, 0.030, 0.031, 0.032]
    assert darl["block_medians_s"] == [0.011, 0.031]
    rows = latency_rows(tmp_path, {"1": {"useful_gflop": 0.3}}, {})
    assert block_ratios(rows, 1, 1, "darl_int8", "st_onnx_int8") == [0.021 / 0.011, 0.046 / 0.031]
    row = next(r for r in rows if r["contender"] == "darl_int8")
    assert (row["rounds"], row["blocks"]) == (6, 2)
    assert row["median_s"] == float(np.median([0.010, 0.011, 0.012, 0.030, 0.031, 0.032]))
