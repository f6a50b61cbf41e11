"""pytest plugin: time your own bundle on your own node from a pytest-benchmark suite of a few lines.

Installed with darl-lite (a ``pytest11`` entry point) and inert unless a run passes ``--darl-bundle``::

    # test_node_latency.py
    def test_score(darl_benchmark, darl_request):
        results = darl_benchmark(darl_request)
        assert len(results) == darl_request.size

    pytest test_node_latency.py --benchmark-only --darl-bundle darl-lite-run/bundle \\
        --darl-sizes 1,10,100 --darl-threads 2

``darl_request`` is parametrised over ``--darl-sizes``: one real query of the shipped DBpedia-Entity
id_test split with that many distinct real items (the rule of ``bench/``: the query with the most
judged items, its own items first). ``darl_benchmark(request, fn=None)`` times ``fn(scorer, query,
items)`` (default ``scorer.score``) the way ``bench/test_latency.py`` does: one untimed warm-up call,
one call that sizes the rounds to about ``--darl-seconds`` (3 to 2,000 rounds), then pytest-benchmark's
``pedantic`` timer with one more warm-up round. ``darl_scorer`` is the loaded :class:`Scorer`
(session-scoped: one load per run). Without ``--darl-bundle`` the fixtures skip the tests that ask
for them, and nothing else changes; the plugin imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from darl_lite.scorer import Scorer

#: Most rounds one case times. High enough that a 1-item call of ~2 ms still fills the case's
#: seconds (200, the cap before, timed 0.4 s of it against 4 s for a 100-item call, and a short
#: block catches a noisy host's passing phase); low enough that the timings stay small in memory.
MAX_ROUNDS = 2000

#: Sizes timed when ``--darl-sizes`` is not given.
DEFAULT_SIZES: tuple[int, ...] = (1, 10, 100)
#: The batch size of bench/ (darl-lite's and sentence-transformers' default).
BATCH_SIZE = 32
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


@dataclass(frozen=True)
class DarlRequest:
    """One timed request: a real query and ``size`` distinct real items."""

    query: str
    items: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class DarlOptions:
    """The plugin's command-line options, checked."""

    bundle: Path
    sizes: tuple[int, ...]
    threads: int
    precision: str
    seconds: float


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("darl-lite", "darl-lite latency of your bundle (active only with --darl-bundle)")
    group.addoption("--darl-bundle", default=None, metavar="PATH", help="bundle to time; turns the plugin on")
    group.addoption(
        "--darl-sizes", default=None, metavar="N,N,...", help="items per request (default 1,10,100)"
    )
    group.addoption(
        "--darl-threads", type=int, default=0, metavar="N", help="onnxruntime intra-op threads (0 = auto)"
    )
    group.addoption("--darl-precision", default="int8", choices=("int8", "fp32"), help="graph to time")
    group.addoption(
        "--darl-seconds", type=float, default=3.0, metavar="S", help="timed seconds per case (default 3)"
    )


def parse_sizes(raw: str | None) -> tuple[int, ...]:
    """``"1,10,100"`` → ``(1, 10, 100)``; anything else is a :class:`pytest.UsageError` saying why."""
    if raw is None:
        return DEFAULT_SIZES
    try:
        sizes = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError as exc:
        raise pytest.UsageError(
            f"--darl-sizes {raw!r}: expected comma-separated integers such as 1,10,100"
        ) from exc
    if not sizes or min(sizes) < 1:
        raise pytest.UsageError(f"--darl-sizes {raw!r}: give at least one size, each >= 1")
    return tuple(dict.fromkeys(sizes))


def options(config: pytest.Config) -> DarlOptions | None:
    """The checked options, or None when ``--darl-bundle`` is absent (the plugin is off)."""
    raw = config.getoption("--darl-bundle", default=None)
    if raw is None:
        return None
    bundle = Path(raw).expanduser()
    if not (bundle / "manifest.json").is_file():
        raise pytest.UsageError(
            f"--darl-bundle {raw}: no manifest.json there; pass a bundle directory "
            "(e.g. darl-lite-run/bundle, written by `darl-lite quickstart` or `darl-lite export`)"
        )
    threads, seconds = config.getoption("--darl-threads"), config.getoption("--darl-seconds")
    if threads < 0:
        raise pytest.UsageError(f"--darl-threads {threads}: give 0 (auto) or a positive count")
    if not seconds > 0:
        raise pytest.UsageError(f"--darl-seconds {seconds}: give a positive number of seconds")
    sizes = parse_sizes(config.getoption("--darl-sizes"))
    return DarlOptions(bundle, sizes, threads, config.getoption("--darl-precision"), seconds)


def pytest_configure(config: pytest.Config) -> None:
    opts = options(config)  # bad options fail the run here, before any test
    if opts is not None and opts.threads:
        # The tokenizers' rayon pool and the BLAS pools read these once, when first used.
        for name in _THREAD_ENV:
            os.environ.setdefault(name, str(opts.threads))


def pytest_report_header(config: pytest.Config) -> str | None:
    opts = options(config)
    if opts is None:
        return None
    return (
        f"darl-lite: bundle {opts.bundle}, {opts.precision}, sizes {list(opts.sizes)}, "
        f"threads {opts.threads or 'auto'}"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "darl_request" not in metafunc.fixturenames:
        return
    opts = options(metafunc.config)
    if opts is not None:
        metafunc.parametrize("darl_request", opts.sizes, indirect=True, ids=[f"n{n}" for n in opts.sizes])


def _active(config: pytest.Config) -> DarlOptions:
    opts = options(config)
    if opts is None:
        pytest.skip("darl-lite latency test: pass --darl-bundle PATH to time a bundle")
    return opts


@lru_cache(maxsize=8)
def shipped_requests(sizes: tuple[int, ...]) -> dict[int, DarlRequest]:
    """For each size n: the id_test query with the most judged items and n distinct real id_test items
    (its own first, then the other queries' items in file order), as ``bench.common.latency_requests``."""
    from darl_lite.datasets import load_dbpedia
    from darl_lite.errors import InputError

    pairs = list(load_dbpedia(fold=0).id_test)
    by_query: dict[str, list[str]] = {}
    for p in pairs:
        by_query.setdefault(p.query, []).append(p.item)
    query = max(by_query, key=lambda q: len(by_query[q]))
    items = list(dict.fromkeys([*by_query[query], *(p.item for p in pairs)]))
    if max(sizes) > len(items):
        raise InputError(f"the shipped id_test split has {len(items)} distinct items; sizes must be <= that")
    return {n: DarlRequest(query, tuple(items[:n])) for n in sizes}


@pytest.fixture(scope="session")
def darl_scorer(pytestconfig: pytest.Config) -> Scorer:
    """The ``--darl-bundle`` bundle, loaded once per run with ``--darl-threads`` and ``--darl-precision``."""
    opts = _active(pytestconfig)
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer

    return Scorer.load(
        opts.bundle,
        precision=opts.precision,
        session=SessionConfig(intra_op_threads=opts.threads),
        batch_size=BATCH_SIZE,
    )


@pytest.fixture()
def darl_request(request: pytest.FixtureRequest) -> DarlRequest:
    """One real request per ``--darl-sizes`` entry (the test is parametrised over them)."""
    opts = _active(request.config)
    return shipped_requests(opts.sizes)[request.param]


def rounds_for(estimate_s: float, seconds: float) -> int:
    """Rounds that time about ``seconds`` of calls of ``estimate_s`` each: 3 at least,
    :data:`MAX_ROUNDS` at most."""
    return max(3, min(MAX_ROUNDS, math.ceil(seconds / max(estimate_s, 1e-6))))


@pytest.fixture()
def darl_benchmark(request: pytest.FixtureRequest, benchmark: Any, darl_scorer: Scorer) -> Callable[..., Any]:
    """``run(darl_request, fn=None)``: time ``fn(scorer, query, items)`` (default ``scorer.score``).

    Asks for pytest-benchmark's ``benchmark`` fixture by name, so ``--benchmark-only`` keeps the test
    (pytest-benchmark comes with ``darl-lite[bench]``).
    """
    opts = _active(request.config)

    def run(req: DarlRequest, fn: Callable[[Scorer, str, list[str]], Any] | None = None) -> Any:
        items = list(req.items)
        score = fn or (lambda scorer, query, its: scorer.score(query, its))

        def call() -> Any:
            return score(darl_scorer, req.query, items)

        call()  # warm-up: the first run of a fresh session on this shape
        started = time.perf_counter()
        call()  # the estimate that sizes the rounds
        rounds = rounds_for(time.perf_counter() - started, opts.seconds)
        benchmark.group = f"darl-lite n={req.size} threads={opts.threads or 'auto'}"
        benchmark.extra_info.update(
            pairs=req.size, threads=opts.threads, precision=opts.precision, bundle=str(opts.bundle)
        )
        return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)

    return run


__all__ = [
    "DEFAULT_SIZES",
    "DarlOptions",
    "DarlRequest",
    "options",
    "parse_sizes",
    "rounds_for",
    "shipped_requests",
]
