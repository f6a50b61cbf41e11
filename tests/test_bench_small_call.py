"""bench/small_call.py on a real bundle: both paths answer alike; the JSON holds both measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.small_call import main
from darl_lite.small_call import SMALL_CALL_PAIRS


def test_small_call_bench_times_both_paths(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "small_call.json"
    sizes = ["1", str(SMALL_CALL_PAIRS + 1)]
    assert main(["--bundle", str(tiny_bundle_dir), "--out", str(out), "--sizes", *sizes,
                 "--reps", "4", "--calls", "4", "--rounds", "2"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    small, large = result["sizes"]["1"], result["sizes"][sizes[1]]
    assert set(small["after_run_us"]) == {"array path", "row path"}
    assert all(v > 0 for v in small["after_run_us"].values())
    assert len(small["whole_call"]["block_ratios"]) == 2 and small["whole_call"]["speed_up"] > 0
    assert "whole_call" not in large  # a larger call takes the array path either way
    assert set(large["after_run_us"]) == {"array path", "row path"}
