"""The pytest plugin (darl_lite/pytest_plugin.py, a pytest11 entry point): a user's 3-line suite times
the committed tiny bundle at each requested size; without --darl-bundle the plugin changes nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from darl_lite.pytest_plugin import MAX_ROUNDS, parse_sizes, rounds_for, shipped_requests

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"

USER_SUITE = """
def test_score(darl_benchmark, darl_request):
    results = darl_benchmark(darl_request)
    assert len(results) == darl_request.size
"""


def test_user_suite_times_the_bundle_at_each_size(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_node=USER_SUITE)
    out = pytester.path / "bench.json"
    result = pytester.runpytest_subprocess(
        "--benchmark-only",
        f"--darl-bundle={BUNDLE}",
        "--darl-sizes=1,10",
        "--darl-threads=1",
        "--darl-seconds=0.05",
        f"--benchmark-json={out}",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["darl-lite: bundle *tiny_bundle, int8, sizes [[]1, 10[]], threads 1"])
    benchmarks = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(benchmarks) == {"test_score[n1]", "test_score[n10]"}
    for name, size in (("test_score[n1]", 1), ("test_score[n10]", 10)):
        bench = benchmarks[name]
        assert bench["extra_info"]["pairs"] == size and bench["extra_info"]["threads"] == 1
        assert bench["group"] == f"darl-lite n={size} threads=1"
        assert 3 <= bench["stats"]["rounds"] <= MAX_ROUNDS
        assert bench["stats"]["median"] > 0


def test_without_bundle_the_plugin_is_inert(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_unrelated="""
import pytest

@pytest.mark.parametrize("x", [1, 2])
def test_plain(x):
    assert x > 0
""",
        test_node=USER_SUITE,
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*pass --darl-bundle PATH to time a bundle*"])
    result.stdout.no_fnmatch_line("darl-lite: bundle*")


def test_bad_options_fail_the_run_with_the_reason(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_node=USER_SUITE)
    missing = pytester.runpytest(f"--darl-bundle={tmp_path}")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*--darl-bundle*no manifest.json there*"])
    sizes = pytester.runpytest(f"--darl-bundle={BUNDLE}", "--darl-sizes=1,ten")
    assert sizes.ret == pytest.ExitCode.USAGE_ERROR
    sizes.stderr.fnmatch_lines(["*--darl-sizes '1,ten': expected comma-separated integers*"])


def test_sizes_rounds_and_requests() -> None:
    assert parse_sizes(None) == (1, 10, 100)
    assert parse_sizes("100,1,100") == (100, 1)
    with pytest.raises(pytest.UsageError, match="each >= 1"):
        parse_sizes("0")
    assert (rounds_for(1.0, 3.0), rounds_for(0.01, 3.0), rounds_for(1e-9, 3.0)) == (3, 300, MAX_ROUNDS)
    assert rounds_for(0.05, 3.0) == 60
    # The same real requests as bench/ (one rule, checked here so the two cannot drift apart).
    sys.path.insert(0, str(ROOT))
    from bench.common import latency_requests

    ours, bench = shipped_requests((1, 10, 100)), latency_requests((1, 10, 100))
    for n in (1, 10, 100):
        assert (ours[n].query, list(ours[n].items)) == bench[n]
        assert len(set(ours[n].items)) == n
