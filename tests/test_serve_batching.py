"""Coalesced serving (darl_lite.serve_batching) over real HTTP on loopback, and the batcher in-process.

Every request must get what scoring it alone gives (fp32: equal within 1e-6; the int8 graph is
dynamically quantized, so a pair's probabilities move a little with its batch neighbours: measured on
the real bundle, 16 coalesced 10-item requests moved a probability by at most 0.057 and flipped one
grade of 160, so the int8 test allows 0.1 and 5% of grades); concurrent requests must share model
passes; bad, cancelled and slow requests must harm only themselves; routing caps stay per request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from uvicorn_thread import serve_in_thread

from darl_lite import Scorer, SessionConfig
from darl_lite.datasets import Splits
from darl_lite.errors import InputError
from darl_lite.routing import RoutingPolicy
from darl_lite.scorer import FlatRequests, PairScore, flatten_requests

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from darl_lite.serve import ServeConfig, create_app  # noqa: E402
from darl_lite.serve_batching import CONCURRENCY_WINDOW_S, RequestBatcher  # noqa: E402

REAL_BUNDLE = Path(__file__).resolve().parent.parent / "darl-lite-run" / "bundle"
#: int8: largest probability move allowed between a coalesced pair and the pair scored alone.
INT8_PROBABILITY_TOLERANCE = 0.1
FP32_TOLERANCE = 1e-6


def _fp32(bundle: Path, **kwargs: Any) -> Scorer:
    return Scorer.load(bundle, precision="fp32", session=SessionConfig(intra_op_threads=1), **kwargs)


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    return _fp32(tiny_bundle_dir)


@pytest.fixture(scope="module")
def real_requests(splits: Splits) -> list[tuple[str, list[str]]]:
    """Real dev queries with 1..12 of their own items each (varied sizes, varied lengths)."""
    by_query: dict[str, list[str]] = {}
    for pair in splits.dev:
        by_query.setdefault(pair.query, []).append(pair.item)
    queries = [q for q in by_query if len(by_query[q]) >= 12][:24]
    assert len(queries) >= 16
    return [(q, by_query[q][: 1 + k % 12]) for k, q in enumerate(queries)]


@pytest.fixture(scope="module")
def url(scorer: Scorer) -> Iterator[str]:
    # A 50 ms linger makes coalescing certain rather than likely for requests fired together.
    yield from serve_in_thread(create_app(scorer, max_items=200, batch_wait_ms=50))


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    rows = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in rows}


async def _post_all(base: str, bodies: Sequence[Any], path: str = "/score", timeout: float = 60) -> list[Any]:
    """POST every body at once (one connection each) and return the responses in order."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        return list(await asyncio.gather(*(client.post(path, json=body) for body in bodies)))


def _post_concurrently(base: str, bodies: Sequence[Any], path: str = "/score") -> list[Any]:
    return asyncio.run(_post_all(base, bodies, path))


def _assert_same(got: list[dict[str, Any]], expected: Sequence[PairScore], tol: float) -> None:
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        want_row = asdict(want)
        np.testing.assert_allclose(row["probabilities"], want_row["probabilities"], atol=tol, rtol=0)
        for key in ("expected_relevance", "ood_score"):
            assert row[key] == pytest.approx(want_row[key], abs=tol, rel=tol)
        for key in ("grade", "routed", "source", "truncated", "note"):
            assert row[key] == want_row[key], key
        assert set(row) == set(want_row)


# --------------------------------------------------------------------------------------------------
# (a) (b) concurrent requests: each gets its own answer, and they shared model passes


def test_concurrent_requests_get_their_own_results_from_shared_passes(
    url: str, scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    requests = real_requests[:16]
    before = _metrics(url)
    responses = _post_concurrently(url, [{"query": q, "items": items} for q, items in requests])
    assert [r.status_code for r in responses] == [200] * 16
    for response, (query, items) in zip(responses, requests, strict=True):
        _assert_same(response.json()["results"], scorer.score_many([(query, items)])[0], FP32_TOLERANCE)
    after = _metrics(url)
    passes = after["darl_lite_model_passes_total"] - before["darl_lite_model_passes_total"]
    assert 1 <= passes < 16, f"16 concurrent requests took {passes} model passes: nothing was coalesced"
    pairs = after["darl_lite_batch_pairs_sum"] - before["darl_lite_batch_pairs_sum"]
    assert pairs == sum(len(items) for _, items in requests)
    calls = after["darl_lite_batch_requests_sum"] - before["darl_lite_batch_requests_sum"]
    assert calls == 16
    health = httpx.get(f"{url}/healthz").json()
    assert health["batching"] == {"enabled": True, "max_batch_pairs": 256, "model_workers": 2}
    assert health["status"] == "ok" and health["fallback"]["configured"] is False


def test_every_route_goes_through_the_batcher(
    url: str, scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    query, items = real_requests[5]
    bodies = [
        ("/score", {"requests": [{"query": query, "items": items}, {"query": "films", "items": []}]}),
        ("/v1/rerank", {"query": query, "documents": items, "darl_lite": True}),
        ("/v2/rerank", {"query": query, "documents": items, "darl_lite": True}),
        ("/rerank", {"query": query, "documents": items, "darl_lite": True}),
        ("/rerank", {"query": query, "texts": items, "raw_scores": True}),
    ]
    before = _metrics(url)["darl_lite_batch_requests_sum"]

    async def go() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return list(await asyncio.gather(*(client.post(path, json=body) for path, body in bodies)))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    alone = scorer.score(query, items)
    batch = responses[0].json()["results"]
    assert batch[1] == []
    _assert_same(batch[0], alone, FP32_TOLERANCE)
    for response in responses[1:4]:
        details = sorted(response.json()["darl_lite"], key=lambda d: d["index"])
        assert [d["grade"] for d in details] == [r.grade for r in alone]
        got = [d["expected_relevance"] for d in details]
        np.testing.assert_allclose(got, [r.expected_relevance for r in alone], atol=FP32_TOLERANCE)
    tei = sorted(responses[4].json(), key=lambda r: r["index"])
    np.testing.assert_allclose(
        [r["score"] for r in tei], [r.expected_relevance for r in alone], atol=FP32_TOLERANCE
    )
    assert _metrics(url)["darl_lite_batch_requests_sum"] - before == len(bodies)


def test_the_batcher_in_process_equals_score_many(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    """16 submits queued before the consumer runs share one pass; each equals score_many alone;
    a multi-query call keeps its own shape; a call over the cap goes alone."""
    calls: list[list[tuple[str, list[str]]]] = [[r] for r in real_requests[:14]]
    calls.append([real_requests[14], ("films", []), real_requests[15]])
    calls.append([("films", [])])

    async def go() -> tuple[list[Any], RequestBatcher]:
        batcher = RequestBatcher(scorer, max_batch_pairs=10_000)
        try:
            return list(await asyncio.gather(*(batcher.submit(c) for c in calls))), batcher
        finally:
            await batcher.close()

    results, batcher = asyncio.run(go())
    assert batcher.passes == 1 and batcher.requests == len(calls)
    for got, call in zip(results, calls, strict=True):
        want = scorer.score_many(call)
        assert [len(g) for g in got] == [len(w) for w in want]
        for g_list, w_list in zip(got, want, strict=True):
            _assert_same([asdict(g) for g in g_list], w_list, FP32_TOLERANCE)

    passes: list[tuple[int, int]] = []

    async def capped() -> None:
        batcher = RequestBatcher(scorer, max_batch_pairs=5, observe=lambda p, c: passes.append((p, c)))
        try:
            await asyncio.gather(*(batcher.submit([r]) for r in real_requests[:6]))
        finally:
            await batcher.close()

    asyncio.run(capped())
    sizes = [len(items) for _, items in real_requests[:6]]
    assert sizes == [1, 2, 3, 4, 5, 6]
    # 6 > the cap: alone. Two model workers may finish their passes in either order, so the
    # passes' make-up is compared, not the order they were observed in.
    assert sorted(passes) == [(3, 1), (3, 2), (4, 1), (5, 1), (6, 1)]


def test_two_model_workers_give_the_same_results(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    """Two workers (each its own one-thread session) score concurrent calls, each as score_many."""
    calls = [[r] for r in real_requests[:12]]

    async def go() -> tuple[list[Any], RequestBatcher]:
        batcher = RequestBatcher(scorer, max_batch_pairs=8, model_workers=2)
        try:
            return list(await asyncio.gather(*(batcher.submit(c) for c in calls))), batcher
        finally:
            await batcher.close()

    results, batcher = asyncio.run(go())
    assert batcher.requests == len(calls) and batcher.passes < len(calls)
    for got, call in zip(results, calls, strict=True):
        _assert_same([asdict(g) for g in got[0]], scorer.score_many(call)[0], FP32_TOLERANCE)
    with pytest.raises(InputError, match="model_workers"):
        RequestBatcher(scorer, model_workers=0)


def test_model_outputs_rows_takes_rows_of_every_array(scorer: Scorer) -> None:
    outputs = scorer.model.run(["q", "q", "r"], ["a", "b", "c"])
    part = outputs.rows(1, 3)
    assert part.logits.shape[0] == part.pooled.shape[0] == len(part.truncated) == len(part.n_tokens) == 2
    np.testing.assert_array_equal(part.logits, outputs.logits[1:3])
    assert (part.ood is None) == (outputs.ood is None)
    q, i = ["q", "q", "r"], ["a", "b", "c"]
    direct, split = scorer.score_arrays(q, i), scorer.finish_arrays(q, i, scorer.model.run(q, i))
    np.testing.assert_array_equal(direct.probabilities, split.probabilities)
    assert direct.notes == split.notes


@pytest.mark.skipif(not (REAL_BUNDLE / "manifest.json").exists(), reason="no real bundle at darl-lite-run/")
def test_real_int8_bundle_under_concurrency(splits: Splits) -> None:
    scorer = Scorer.load(REAL_BUNDLE, precision="int8", session=SessionConfig(intra_op_threads=1))
    by_query: dict[str, list[str]] = {}
    for pair in splits.id_test:
        by_query.setdefault(pair.query, []).append(pair.item)
    requests = [(q, its[:10]) for q, its in by_query.items() if len(its) >= 10][:16]
    for base in serve_in_thread(create_app(scorer, batch_wait_ms=50)):
        before = _metrics(base)["darl_lite_model_passes_total"]
        responses = _post_concurrently(base, [{"query": q, "items": items} for q, items in requests])
        assert _metrics(base)["darl_lite_model_passes_total"] - before < len(requests)
    assert [r.status_code for r in responses] == [200] * len(requests)
    flips = total = 0
    for response, (query, items) in zip(responses, requests, strict=True):
        got = response.json()["results"]
        alone = scorer.score_many([(query, items)])[0]
        for row, want in zip(got, alone, strict=True):
            assert np.allclose(row["probabilities"], want.probabilities, atol=INT8_PROBABILITY_TOLERANCE)
            assert abs(sum(row["probabilities"]) - 1) < 1e-6
            flips += row["grade"] != want.grade
            total += 1
        # the ranking barely moves: the best item alone is near the top coalesced
        best = max(range(len(alone)), key=lambda k: alone[k].expected_relevance)
        order = sorted(range(len(got)), key=lambda k: -got[k]["expected_relevance"])
        assert best in order[:3]
    assert flips <= 0.05 * total


# --------------------------------------------------------------------------------------------------
# (c) (d) bad and cancelled requests harm only themselves


def test_a_bad_request_among_good_ones_gets_its_422(
    url: str, scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    good = [{"query": q, "items": items} for q, items in real_requests[:8]]
    bad = [
        {"query": "q", "items": ["fine", "  "]},
        {"query": "", "items": ["a"]},
        {"query": "q", "items": [3]},
    ]
    bodies = good[:4] + bad[:1] + good[4:] + bad[1:]
    responses = _post_concurrently(url, bodies)
    codes = [r.status_code for r in responses]
    assert codes == [200] * 4 + [422] + [200] * 4 + [422, 422]
    assert "requests[0].items[1] is empty" in responses[4].json()["detail"]
    assert "requests[0].query is empty" in responses[9].json()["detail"]
    assert "requests[0].items[0] must be a string" in responses[10].json()["detail"]
    for response, (query, items) in zip(responses[:4] + responses[5:9], real_requests[:8], strict=True):
        _assert_same(response.json()["results"], scorer.score_many([(query, items)])[0], FP32_TOLERANCE)


def test_a_failing_pass_is_retried_per_call(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    """A call the model refuses (misaligned pairs, which bypassed validation) fails alone."""
    broken = FlatRequests(["q", "q"], ["only one item"], [2])

    async def go() -> tuple[list[Any], RequestBatcher]:
        batcher = RequestBatcher(scorer)
        try:
            calls = [batcher.submit([real_requests[0]]), batcher.submit_flat(broken)]
            calls.append(batcher.submit([real_requests[1]]))
            out = list(await asyncio.gather(*calls, return_exceptions=True))
            out.append(await batcher.submit([real_requests[2]]))  # the consumer lives on
            return out, batcher
        finally:
            await batcher.close()

    (first, error, third, later), batcher = asyncio.run(go())
    assert isinstance(error, InputError) and "2 queries but 1 items" in str(error)
    for got, request in ((first, real_requests[0]), (third, real_requests[1]), (later, real_requests[2])):
        _assert_same([asdict(g) for g in got[0]], scorer.score_many([request])[0], FP32_TOLERANCE)
    assert batcher.passes == 3  # the failed batched pass is not counted: two retries, then ``later``


def test_a_cancelled_submit_is_skipped(scorer: Scorer, real_requests: list[tuple[str, list[str]]]) -> None:
    async def go() -> tuple[list[Any], RequestBatcher]:
        batcher = RequestBatcher(scorer)
        try:
            tasks = [asyncio.ensure_future(batcher.submit([r])) for r in real_requests[:3]]
            await asyncio.sleep(0)  # all three queued; the consumer has not run yet
            tasks[1].cancel()
            out = list(await asyncio.gather(*tasks, return_exceptions=True))
            out.append(await batcher.submit([real_requests[3]]))
            return out, batcher
        finally:
            await batcher.close()

    (first, cancelled, third, later), batcher = asyncio.run(go())
    assert isinstance(cancelled, asyncio.CancelledError)
    sizes = [len(items) for _, items in real_requests[:4]]
    assert batcher.pairs == sizes[0] + sizes[2] + sizes[3]  # the cancelled call was never scored
    for got, request in ((first, real_requests[0]), (third, real_requests[2]), (later, real_requests[3])):
        _assert_same([asdict(g) for g in got[0]], scorer.score_many([request])[0], FP32_TOLERANCE)


def test_clients_that_disconnect_do_not_break_later_requests(
    url: str, scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    big = {"query": "szechwan cuisine", "items": [f"dish number {k} with chilli" for k in range(200)]}

    async def go() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=0.02) as impatient:
            gone = await asyncio.gather(
                *(impatient.post("/score", json=big) for _ in range(6)), return_exceptions=True
            )
        assert all(
            isinstance(g, httpx.TimeoutException) or (isinstance(g, httpx.Response) and g.status_code == 200)
            for g in gone
        )
        return await _post_all(url, [{"query": q, "items": items} for q, items in real_requests[:8]])

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 8
    for response, (query, items) in zip(responses, real_requests[:8], strict=True):
        _assert_same(response.json()["results"], scorer.score_many([(query, items)])[0], FP32_TOLERANCE)
    assert httpx.get(f"{url}/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------
# (e) routing caps stay per request; (g) a slow fallback delays only its own request


def test_routing_caps_and_notes_stay_per_request(
    tiny_bundle_dir: Path, real_requests: list[tuple[str, list[str]]]
) -> None:
    # margin_threshold=1: every pair is a candidate; at most a quarter of each call's pairs may go.
    scorer = _fp32(tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0, max_route_fraction=0.25))
    requests = real_requests[:16]
    for base in serve_in_thread(create_app(scorer, batch_wait_ms=50)):
        before = _metrics(base)["darl_lite_model_passes_total"]
        responses = _post_concurrently(base, [{"query": q, "items": items} for q, items in requests])
        assert _metrics(base)["darl_lite_model_passes_total"] - before < len(requests)
    for response, (query, items) in zip(responses, requests, strict=True):
        got = response.json()["results"]
        routed = sum(r["routed"] for r in got)
        assert routed == int(np.floor(0.25 * len(items) + 1e-9))  # its own cap, not the pooled batch's
        kept = {r["note"] for r in got if not r["routed"]}
        assert {r["note"] for r in got if r["routed"]} <= {"no fallback configured: student answer kept"}
        assert kept <= {"routing budget exhausted: student answer kept"}
        _assert_same(got, scorer.score_many([(query, items)])[0], FP32_TOLERANCE)


SLOW_QUERY = "a query whose routed pairs the fallback answers slowly"
SLOW_S = 2.0


def test_a_slow_fallback_delays_only_its_own_request(
    tiny_bundle_dir: Path, real_requests: list[tuple[str, list[str]]]
) -> None:
    started = threading.Event()

    def fallback(pairs: list[tuple[str, str]]) -> Any:
        if any(q == SLOW_QUERY for q, _ in pairs):
            started.set()
            time.sleep(SLOW_S)
        return np.full((len(pairs), 3), 1 / 3)

    scorer = _fp32(
        tiny_bundle_dir,
        routing=RoutingPolicy(margin_threshold=1.0, max_route_fraction=0.2),
        fallback=fallback,
    )
    slow = {"query": SLOW_QUERY, "items": ["Mapo doufu", "Afghan cuisine", "Kung Pao chicken", "tea", "rice"]}
    fast = [{"query": q, "items": items} for q, items in real_requests[:8]]

    async def go(base: str) -> tuple[Any, list[tuple[float, Any]]]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            slow_task = asyncio.ensure_future(client.post("/score", json=slow))
            while not started.is_set():  # its model pass is done, its fallback asleep
                await asyncio.sleep(0.005)

            async def timed(body: Any) -> tuple[float, Any]:
                t0 = time.perf_counter()
                response = await client.post("/score", json=body)
                return time.perf_counter() - t0, response

            fast_done = await asyncio.gather(*(timed(body) for body in fast))
            assert not slow_task.done()  # the fast ones finished while the slow fallback slept
            return await slow_task, fast_done

    for base in serve_in_thread(create_app(scorer)):
        t0 = time.perf_counter()
        slow_response, fast_done = asyncio.run(go(base))
        slow_s = time.perf_counter() - t0
    assert slow_response.status_code == 200 and slow_s >= SLOW_S
    assert sum(r["source"] == "llm" for r in slow_response.json()["results"]) == 1
    for seconds, response in fast_done:
        assert response.status_code == 200 and seconds < SLOW_S / 2
        assert all(r["source"] == "llm" for r in response.json()["results"] if r["routed"])


# --------------------------------------------------------------------------------------------------
# (f) the unbatched path and the options


def test_no_batching_still_serves(scorer: Scorer, real_requests: list[tuple[str, list[str]]]) -> None:
    requests = real_requests[:8]
    for base in serve_in_thread(create_app(scorer, batching=False)):
        assert httpx.get(f"{base}/healthz").json()["batching"] == {
            "enabled": False,
            "max_batch_pairs": None,
            "model_workers": None,
        }
        before = _metrics(base)["darl_lite_model_passes_total"]
        responses = _post_concurrently(base, [{"query": q, "items": items} for q, items in requests])
        rerank = httpx.post(f"{base}/v2/rerank", json={"query": "q", "documents": ["a", "b"]})
        passes = _metrics(base)["darl_lite_model_passes_total"] - before
    assert rerank.status_code == 200 and len(rerank.json()["results"]) == 2
    assert passes == len(requests) + 1  # one per request
    for response, (query, items) in zip(responses, requests, strict=True):
        _assert_same(response.json()["results"], scorer.score_many([(query, items)])[0], FP32_TOLERANCE)


def _gate_first_pass(batcher: RequestBatcher) -> tuple[threading.Event, threading.Event]:
    """Hold the first model pass (whichever worker runs it) until ``release`` is set: a slow pass,
    so what the other worker does meanwhile can be watched. Returns ``(entered, release)``."""
    entered, release = threading.Event(), threading.Event()
    lock = threading.Lock()
    first = [True]
    for model in batcher._models:
        run = model.run

        def gated(queries: Any, items: Any, run: Any = run) -> Any:
            with lock:
                hold, first[0] = first[0], False
            if hold:
                entered.set()
                release.wait(30)
            return run(queries, items)

        model.run = gated  # type: ignore[method-assign]
    return entered, release


async def _until(flag: threading.Event) -> None:
    deadline = time.monotonic() + 30
    while not flag.is_set():
        assert time.monotonic() < deadline, "the first pass never started"
        await asyncio.sleep(0.001)


def test_the_clients_concurrency_forgets_a_quiet_spell(scorer: Scorer) -> None:
    """The peak a free worker waits for is the last one to two windows' (CONCURRENCY_WINDOW_S), not
    one from before the node went quiet."""

    def company_after(quiet_s: float) -> bool:
        batcher = RequestBatcher(scorer)
        batcher._in_passes = 4  # four clients' calls held at once
        batcher._note_peak(0.5)
        batcher._in_passes = 1  # one call held, ``quiet_s`` later
        batcher._note_peak(0.5 + quiet_s)
        return batcher._company_may_come()

    assert company_after(CONCURRENCY_WINDOW_S * 1.2)  # the next window: the peak still counts
    assert not company_after(CONCURRENCY_WINDOW_S * 10)  # after a quiet spell: it does not


async def _clients_at_once(batcher: RequestBatcher, requests: list[tuple[str, list[str]]]) -> None:
    """Serve ``requests`` concurrently, as that many clients would: the batcher then knows the
    clients' concurrency (the most calls it held at once), which decides whether waiting for
    company can pay."""
    await asyncio.gather(*(batcher.submit([r]) for r in requests))


def test_a_free_worker_gathers_company_while_another_pass_runs(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    """While one pass runs, a request that arrives alone waits for company (up to ``gather_wait_ms``)
    while more clients than are held have been seen, and shares the next pass with the one after
    it; a lone request never waits."""
    a, b, c = (real_requests[k] for k in (1, 2, 3))  # 2, 3 and 4 items: no split of a lone pass
    want_b, want_c = scorer.score_many([b])[0], scorer.score_many([c])[0]

    async def go() -> float:
        batcher = RequestBatcher(scorer, gather_pairs=len(b[1]) + len(c[1]), gather_wait_ms=10_000)
        try:
            started = time.perf_counter()
            await batcher.submit([a])  # nothing else runs: no wait, whatever gather_wait_ms says
            lone_s = time.perf_counter() - started
            await _clients_at_once(batcher, [a, b, c])  # three clients
            before = batcher.passes
            entered, release = _gate_first_pass(batcher)
            first = asyncio.ensure_future(batcher.submit([a]))
            await _until(entered)
            second = asyncio.ensure_future(batcher.submit([b]))
            await asyncio.sleep(0.2)
            assert not second.done() and batcher.passes == before  # waiting for company, not started
            third = asyncio.ensure_future(batcher.submit([c]))
            (got_b,), (got_c,) = await asyncio.gather(second, third)  # enough pairs queued: it goes
            assert batcher.passes == before + 1  # b and c in one pass, a still held
            _assert_same([asdict(g) for g in got_b], want_b, FP32_TOLERANCE)
            _assert_same([asdict(g) for g in got_c], want_c, FP32_TOLERANCE)
            release.set()
            await first
            assert batcher.passes == before + 2
            return lone_s
        finally:
            await batcher.close()

    assert asyncio.run(go()) < 5


def test_a_free_worker_does_not_wait_for_company_that_cannot_come(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    """With two clients, one in the running pass and the other's request queued, every client is
    held: nobody else can join, so the free worker starts at once, whatever ``gather_wait_ms`` says."""
    a, b = real_requests[1], real_requests[2]

    async def go() -> float:
        batcher = RequestBatcher(scorer, gather_pairs=1000, gather_wait_ms=60_000)
        try:
            await _clients_at_once(batcher, [a, b])  # two clients
            entered, release = _gate_first_pass(batcher)
            first = asyncio.ensure_future(batcher.submit([a]))
            await _until(entered)
            started = time.perf_counter()
            await batcher.submit([b])  # goes while the first pass is still held
            waited = time.perf_counter() - started
            assert not first.done()
            release.set()
            await first
            return waited
        finally:
            await batcher.close()

    assert asyncio.run(go()) < 5  # not the 60 s gather wait


def test_gathering_ends_when_the_other_pass_ends_or_at_its_deadline(
    scorer: Scorer, real_requests: list[tuple[str, list[str]]]
) -> None:
    a, b = real_requests[1], real_requests[2]

    async def waited(gather_wait_ms: float, release_after_s: float | None) -> float:
        batcher = RequestBatcher(scorer, gather_pairs=1000, gather_wait_ms=gather_wait_ms)
        try:
            await _clients_at_once(batcher, [a, b, a])  # three clients: company may come
            entered, release = _gate_first_pass(batcher)
            first = asyncio.ensure_future(batcher.submit([a]))
            await _until(entered)
            started = time.perf_counter()
            second = asyncio.ensure_future(batcher.submit([b]))
            if release_after_s is not None:
                await asyncio.sleep(release_after_s)
                release.set()
            await second
            release.set()
            await first
            return time.perf_counter() - started
        finally:
            await batcher.close()

    assert 0.05 <= asyncio.run(waited(50, None)) < 5  # its deadline: 50 ms
    assert 0.1 <= asyncio.run(waited(60_000, 0.1)) < 5  # the held pass ended after 0.1 s: it goes


def test_bad_gather_options_are_refused(scorer: Scorer, tiny_bundle_dir: Path) -> None:
    from darl_lite.cli import build_parser

    for bad in (-1, float("inf"), "2"):
        with pytest.raises(InputError, match="gather_wait_ms"):
            RequestBatcher(scorer, gather_wait_ms=bad)  # type: ignore[arg-type]
        with pytest.raises(InputError, match="gather_wait_ms"):
            ServeConfig(gather_wait_ms=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="gather_pairs must be an integer"):
        RequestBatcher(scorer, gather_pairs=0)
    assert ServeConfig().gather_wait_ms == 2.0
    args = build_parser().parse_args(["serve", str(tiny_bundle_dir), "--gather-wait-ms", "0"])
    assert args.gather_wait_ms == 0.0


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "64"])
def test_bad_batching_options_are_refused(scorer: Scorer, value: Any) -> None:
    with pytest.raises(InputError, match="max_batch_pairs"):
        ServeConfig(max_batch_pairs=value)
    with pytest.raises(InputError, match="max_batch_pairs"):
        create_app(scorer, max_batch_pairs=value)
    with pytest.raises(InputError, match="max_batch_pairs"):
        RequestBatcher(scorer, max_batch_pairs=value)


def test_bad_batching_flags(scorer: Scorer) -> None:
    with pytest.raises(InputError, match="batching must be true or false"):
        ServeConfig(batching="yes")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_wait_ms"):
        RequestBatcher(scorer, max_wait_ms=-1)
    with pytest.raises(InputError, match="max_wait_ms"):
        create_app(scorer, batch_wait_ms=float("nan"))
    assert ServeConfig().batching and ServeConfig().max_batch_pairs == 256


def test_cli_batching_options(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from darl_lite.cli import build_parser, main

    argv = ["serve", str(tiny_bundle_dir), "--no-batching", "--max-batch-pairs", "64"]
    args = build_parser().parse_args(argv)
    assert args.no_batching and args.max_batch_pairs == 64
    defaults = build_parser().parse_args(["serve", str(tiny_bundle_dir)])
    assert not defaults.no_batching and defaults.max_batch_pairs == 256
    assert main(["serve", str(tiny_bundle_dir), "--max-batch-pairs", "0"]) == 2
    assert "--max-batch-pairs" in capsys.readouterr().err


def test_flatten_requests_keeps_score_many_messages() -> None:
    flat = flatten_requests([("q", ["a", "b"]), ("r", [])])
    assert flat.queries == ["q", "q"] and flat.items == ["a", "b"] and flat.sizes == [2, 0]
    with pytest.raises(InputError, match=r"requests\[1\]\.items\[0\] is empty"):
        flatten_requests([("q", ["a"]), ("r", [" "])])
