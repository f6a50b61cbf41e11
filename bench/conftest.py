"""Benchmark fixtures: the bundle and student under test, real pairs from the shipped data, contenders.

Environment:
    DARL_LITE_BUNDLE   the bundle (default: the quickstart's darl-lite-run/bundle)
    DARL_BENCH_ST_DIR  a student folder with ST's ONNX exports (``bench.common.prepare_st_models``);
                       without it the sentence-transformers contenders are skipped
    DARL_BENCH_THREADS thread budgets to run, e.g. "2" (default "1,2"); ``bench.run`` runs one
                       process per budget so the tokenizers' and BLAS pools are held to it as well
    DARL_BENCH_SIZES   items per query, e.g. "1,10" (default "1,10,100,1000")
    DARL_BENCH_SECONDS target seconds of timed calls per case (default 3; rounds 3..2000 a block)
    DARL_BENCH_BLOCKS  blocks each case is timed in (default 1): the seconds are shared among them,
                       and within one thread budget and size the blocks of all contenders take
                       turns, the contenders' order rotated by one each block (:func:`block_order`)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.common import CONTENDERS, SIZES, THREADS, ContenderFactory, latency_requests


def _ints(name: str, default: tuple[int, ...]) -> list[int]:
    raw = os.environ.get(name)
    return [int(x) for x in raw.split(",")] if raw else list(default)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "threads" in metafunc.fixturenames:
        metafunc.parametrize("threads", _ints("DARL_BENCH_THREADS", THREADS), ids=lambda t: f"t{t}")
    if "n_items" in metafunc.fixturenames:
        metafunc.parametrize("n_items", _ints("DARL_BENCH_SIZES", SIZES), ids=lambda n: f"n{n}")
    if "block" in metafunc.fixturenames:
        metafunc.parametrize("block", range(_blocks()), ids=lambda b: f"b{b}")


def _blocks() -> int:
    """``DARL_BENCH_BLOCKS`` (default 1), checked: a usage error names the variable and the value."""
    raw = os.environ.get("DARL_BENCH_BLOCKS", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"DARL_BENCH_BLOCKS must be a whole number >= 1, got {raw!r}")
    return int(raw)


def block_order(threads: int, n_items: int, block: int, contender: str) -> tuple[int, int, int, int]:
    """Where a latency case runs: by thread budget, size and block, and within a block the
    contenders in their listed order rotated by ``block``.

    One block per contender in a fixed order lets a passing phase of a shared host (these last
    seconds to minutes) fall on one contender and not the next, and always times the same contender
    first in its process. Blocks that take turns spread every contender over the same minutes, and
    the rotation puts each one first in turn."""
    names = list(CONTENDERS)
    return threads, n_items, block, (names.index(contender) - block) % len(names)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The latency cases in :func:`block_order`, in the places they held; other tests stay put."""
    keyed = []
    for position, item in enumerate(items):
        params = getattr(getattr(item, "callspec", None), "params", {})
        if {"threads", "n_items", "block", "contender"} <= params.keys():
            key = block_order(params["threads"], params["n_items"], params["block"], params["contender"])
            keyed.append((key, position, item))
    ordered = sorted(keyed, key=lambda k: (k[0], k[1]))
    for (_, position, _), (_, _, item) in zip(keyed, ordered, strict=True):
        items[position] = item


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    """The bundle to measure: $DARL_LITE_BUNDLE, or the quickstart's (run `darl-lite quickstart` first)."""
    path = Path(os.environ.get("DARL_LITE_BUNDLE", "darl-lite-run/bundle"))
    if not (path / "manifest.json").is_file():
        pytest.skip(f"no bundle at {path}: run `darl-lite quickstart` or set DARL_LITE_BUNDLE")
    return path


@pytest.fixture(scope="session")
def st_dir() -> Path | None:
    raw = os.environ.get("DARL_BENCH_ST_DIR")
    return Path(raw) if raw else None


@pytest.fixture(scope="session")
def factory(bundle_dir: Path, st_dir: Path | None) -> ContenderFactory:
    from darl_lite.bundle import load_bundle

    return ContenderFactory(bundle_dir, st_dir, max_length=load_bundle(bundle_dir, verify=False).max_length)


@pytest.fixture(scope="session")
def query_items() -> dict[int, tuple[str, list[str]]]:
    """For each size, one real id_test query with that many distinct real id_test items."""
    return latency_requests(tuple(sorted(set(_ints("DARL_BENCH_SIZES", SIZES)))))


@pytest.fixture(scope="session")
def seconds_per_case() -> float:
    return float(os.environ.get("DARL_BENCH_SECONDS", "3"))


@pytest.fixture(scope="session")
def blocks() -> int:
    return _blocks()
