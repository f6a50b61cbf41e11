"""Latency of darl-lite against its floor and its peers: same weights, same pairs, same threads.

    python -m bench.run ...           # the documented way: one process per thread budget, then the report
    DARL_LITE_BUNDLE=/tmp/qs_ref/bundle DARL_BENCH_ST_DIR=... pytest bench/test_latency.py \
        --benchmark-only --benchmark-json=out.json

One round = one request: one query with ``n_items`` items, scored end to end (for darl-lite:
validation, tokenising, bucketing, the ONNX graph, OOD score, routing, result objects). The raw
session runs the int8 graph on the runtime's own batch plan, pre-tokenised and pre-padded: the floor
for this model; the runtime's overhead is the gap. Rounds are sized so each case times about
``DARL_BENCH_SECONDS`` of calls (at least 3, at most 2,000), after warm-up calls: the rule of the
pytest plugin users time their own nodes with (``darl_lite.pytest_plugin.rounds_for``). With
``DARL_BENCH_BLOCKS`` > 1 each case is timed in that many blocks sharing its seconds, the blocks of
all contenders taking turns (``bench.conftest.block_order``); the report pools a case's blocks.
"""

from __future__ import annotations

import time

import pytest

from bench.common import CONTENDERS
from darl_lite.pytest_plugin import rounds_for


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_latency(
    benchmark,
    factory,
    st_dir,
    query_items,
    seconds_per_case,
    blocks,
    contender: str,
    n_items: int,
    threads: int,
    block: int,
) -> None:
    if contender.startswith("st_") and st_dir is None:
        pytest.skip("set DARL_BENCH_ST_DIR (bench.run does) for the sentence-transformers contenders")
    query, items = query_items[n_items]
    call = factory.prepare(contender, threads, query, items)
    call()  # warm-up: first run of a fresh session on this shape
    started = time.perf_counter()
    call()  # the estimate that sizes the rounds
    estimate = time.perf_counter() - started
    rounds = rounds_for(estimate, seconds_per_case / blocks)
    result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    assert result is not None
    benchmark.group = f"n={n_items} threads={threads}"
    benchmark.extra_info.update(contender=contender, pairs=n_items, threads=threads, block=block)
