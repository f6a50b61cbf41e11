"""A server under concurrent load: a bounded asyncio client for anything that speaks darl-lite's ``/score``.

    darl-lite serve darl-lite-run/bundle --port 8080 --threads 2 &          # or: python -m bench.peer_server
    python -m bench.load_server --url http://127.0.0.1:8080 --out bench/results/load_darl.json

Each case is one request size × one concurrency: requests of one real id_test query with 10 (or
100) distinct real id_test items, sent by ``concurrency`` workers that each keep one request in
flight, after ``--warmup`` untimed requests. How many: ``--pairs`` scored pairs per case (default
20,000: 2,000 requests of 10 items, 200 of 100), so every size does the same work and runs about
as long; or ``--requests`` requests whatever their size. Why equal work: a case's start (workers
that find one request, a pipeline still filling) and end (the last passes half full) cost about
the same wall time at any size, and a case of 150 10-item requests (2-3 s) weighed them ten times
more than one of 150 100-item requests: at concurrency 16 on the same server, 150 10-item requests
gave 550 pairs/s and 1,500 gave 597 (median of 4 alternating rounds, 2026-12-07, AVX2 machine).
Every size scores the same items: the
largest size's request (``bench.common.latency_requests``) is cut into slices of the smaller size,
sent in turn (``request_slices``), so pairs per second compare request sizes on the same work per
pair. (A 10-item prefix alone has longer items than the 100-item request: 14.0 against 12.9 tokens,
about 7% more work per pair, which would show up as a per-request cost that is not one.)
A case stops when its requests are done or at ``--deadline`` seconds, whichever comes first
(in-flight requests are then cancelled and not counted); every request has ``--timeout`` too. A
response counts only when it is 200 with one result per item. Reported per case: throughput
(scored pairs per second of wall time), requests per second, p50 / p99 / max latency, errors and
what stopped it. Loopback only: the client refuses any other host (the client shares the server's
cores, which the figures include; say so beside them).

The client is lean on purpose (:class:`HTTPConnection`: one keep-alive HTTP/1.1 connection per
worker, the request's bytes built once per case, the answer read by its ``Content-Length``; on
uvloop when installed), because its CPU comes out of the servers' two cores: httpx on asyncio cost
about 1.1 ms of CPU per 10-item request, this one about 0.1 ms, and with it the same darl-lite
server (on asyncio + h11) served 10-item requests at concurrency 16 at 1,804 pairs/s, not 1,456
(2026-12-02, one run each). Every server under test gets the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SIZES: tuple[int, ...] = (10, 100)
CONCURRENCY: tuple[int, ...] = (1, 4, 16)
PAIRS = 20_000  # scored pairs per case by default (module docstring: equal work per case)
T = TypeVar("T")


@dataclass(frozen=True)
class CaseResult:
    """One size × concurrency case."""

    items: int
    concurrency: int
    requested: int
    completed: int
    errors: int
    stopped_by: str  # "count" or "deadline"
    wall_s: float
    pairs_per_s: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    first_error: str | None


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, or ValueError when its host is not loopback."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"--url {url}: the load generator talks to loopback only ({', '.join(LOOPBACK)})")
    return url.rstrip("/")


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def _decode(raw: bytes) -> Any:
    try:
        import orjson
    except ImportError:
        return json.loads(raw)
    return orjson.loads(raw)


class HTTPConnection:
    """One HTTP/1.1 keep-alive connection, one request at a time, reopened when the server closes it.

    Why not httpx: the load generator shares the server's cores, and httpx's per-request Python
    (httpcore's pool, h11, its models) took about 1.1 ms of CPU per request from them; this writes
    pre-formatted request bytes and reads the answer by its ``Content-Length`` (or its chunks).
    """

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {host}:{port}\r\n{extra}".encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def message(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The request's bytes (built once per case: every request of a case is the same)."""
        lines = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._head
        if body is None:
            return lines + b"\r\n"
        length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        return lines + length.encode("latin-1") + body

    async def open(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(self, message: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one request; a kept-alive connection the server had closed is
        reopened once (nothing of the answer read yet), as HTTP clients do."""
        reused = self._writer is not None
        try:
            return await self._exchange(message)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            return await self._exchange(message)

    async def _exchange(self, message: bytes) -> tuple[int, bytes]:
        await self.open()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(message)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await _read_chunked(reader)
        else:  # delimited by the end of the connection
            body = await reader.read()
            headers[b"connection"] = b"close"
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def requests_per_case(items: int, *, pairs: int | None, requests: int | None) -> int:
    """Requests a case of ``items``-item requests sends: ``requests`` when given, else enough for
    ``pairs`` scored pairs (at least one); ValueError naming the option when neither is usable."""
    if items < 1:
        raise ValueError(f"request size must be >= 1, got {items}")
    if (pairs is None) == (requests is None):
        raise ValueError("give exactly one of pairs (--pairs) and requests (--requests)")
    if requests is not None:
        if requests < 1:
            raise ValueError(f"--requests must be >= 1, got {requests}")
        return requests
    assert pairs is not None
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    return max(1, round(pairs / items))


def request_slices(items: list[str], size: int) -> list[list[str]]:
    """``items`` cut into consecutive slices of ``size`` (a shorter tail is dropped; at least one)."""
    if size < 1:
        raise ValueError(f"request size must be >= 1, got {size}")
    slices = [items[i : i + size] for i in range(0, len(items) - size + 1, size)]
    return slices or [items[:size]]


async def run_case(
    connections: list[HTTPConnection],
    query: str,
    item_lists: Sequence[list[str]],
    requests: int,
    deadline_s: float,
    warmup: int = 2,
    timeout_s: float = 30.0,
) -> CaseResult:
    """Send ``requests`` POST /score requests, one worker per connection (the concurrency), stopping
    at ``deadline_s``; connections are opened (and ``warmup`` requests sent) before the clock starts.
    ``item_lists``: the items of each request, equal in size, sent in turn."""
    concurrency = len(connections)
    if concurrency < 1 or requests < 1 or deadline_s <= 0:
        raise ValueError("concurrency and requests must be >= 1 and the deadline > 0")
    rotation = [list(x) for x in item_lists]
    if len({len(r) for r in rotation}) != 1:
        raise ValueError("every request of a case must have the same number of items")
    messages = [
        connections[0].message("POST", "/score", json.dumps({"query": query, "items": r}).encode())
        for r in rotation
    ]
    n_items = len(rotation[0])
    await asyncio.gather(*(c.open() for c in connections))
    for i in range(warmup):
        await _one(connections[0], messages[i % len(messages)], n_items, timeout_s)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0

    async def worker(connection: HTTPConnection) -> None:
        nonlocal issued
        while issued < requests:
            message = messages[issued % len(messages)]
            issued += 1
            started = time.perf_counter()
            problem = await _one(connection, message, n_items, timeout_s)
            if problem is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(problem)

    started = time.perf_counter()
    pending = {asyncio.create_task(worker(c)) for c in connections}
    while pending:  # uvloop's millisecond timers may fire a little early: wait out the deadline
        left = started + deadline_s - time.perf_counter()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=left)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    ms = [x * 1e3 for x in latencies]
    return CaseResult(
        items=n_items,
        concurrency=concurrency,
        requested=requests,
        completed=len(latencies),
        errors=len(errors),
        stopped_by="deadline" if pending else "count",
        wall_s=wall,
        pairs_per_s=len(latencies) * n_items / wall,
        requests_per_s=len(latencies) / wall,
        p50_ms=_percentile(ms, 50),
        p99_ms=_percentile(ms, 99),
        max_ms=max(ms) if ms else None,
        first_error=errors[0] if errors else None,
    )


async def _within(seconds: float, coro: Coroutine[Any, Any, T]) -> T:
    """``await coro``, or TimeoutError after ``seconds`` (no extra task per request on 3.11+)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


async def _one(connection: HTTPConnection, message: bytes, n_items: int, timeout_s: float) -> str | None:
    """None when the server answered 200 with one result per item; else what went wrong."""
    try:
        status, body = await _within(timeout_s, connection.send(message))
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
        connection.close()  # its state is unknown: the next request opens a fresh one
        return f"{type(exc).__name__}: {exc}"
    if status != 200:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    try:
        results = _decode(body).get("results")
    except (ValueError, AttributeError) as exc:
        return f"the answer is not a JSON object: {exc}"
    if not isinstance(results, list) or len(results) != n_items:
        return f"expected {n_items} results, got {type(results).__name__} of {len(results or [])}"
    return None


async def run_load(
    url: str,
    *,
    sizes: tuple[int, ...] = SIZES,
    concurrency: tuple[int, ...] = CONCURRENCY,
    requests: int | None = None,
    deadline_s: float = 120.0,
    timeout_s: float = 30.0,
    warmup: int = 2,
    token: str | None = None,
    pairs: int | None = None,
) -> dict[str, Any]:
    """Every size × concurrency case against ``url``, one after the other; JSON-ready.

    Each case sends ``requests`` requests, or (default) enough for ``pairs`` scored pairs
    (:data:`PAIRS` when neither is given): :func:`requests_per_case`."""
    from bench.common import latency_requests

    base = check_loopback(url)
    if requests is None and pairs is None:
        pairs = PAIRS
    counts = {n: requests_per_case(n, pairs=pairs, requests=requests) for n in sizes}
    parts = urlparse(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    largest = max(sizes)
    query, pool = latency_requests((largest,))[largest]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    cases: list[CaseResult] = []
    probe = HTTPConnection(host, port, headers)
    status, raw = await _within(timeout_s, probe.send(probe.message("GET", "/healthz")))
    probe.close()
    health = _decode(raw) if status == 200 else {"status": status}
    for n in sizes:
        slices = request_slices(pool, n)  # every size scores the same items (module docstring)
        for c in concurrency:
            connections = [HTTPConnection(host, port, headers) for _ in range(c)]
            try:
                cases.append(
                    await run_case(connections, query, slices, counts[n], deadline_s, warmup, timeout_s)
                )
            finally:
                for connection in connections:
                    connection.close()
    return {
        "url": base,
        "server_health": health,
        "load_average_before": os.getloadavg()[0],
        "client": f"bench.load_server.HTTPConnection on {event_loop_name()}",
        "items": f"slices of the {largest}-item request, sent in turn",
        "settings": {
            "pairs": pairs,
            "requests": requests,
            "requests_per_case": {str(n): k for n, k in counts.items()},
            "deadline_s": deadline_s,
            "timeout_s": timeout_s,
            "warmup": warmup,
        },
        "cases": [asdict(c) for c in cases],
    }


def event_loop_name() -> str:
    """The loop :func:`run` uses: uvloop when installed (the serve extra brings it), else asyncio's."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on uvloop when installed: the client's own CPU per request is part of
    what the figures measure, so it should be as small for every server."""
    if event_loop_name() == "uvloop" and sys.version_info >= (3, 11):
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def markdown(report: dict[str, Any]) -> str:
    """The cases as a Markdown table."""
    rows = [
        "| items | concurrency | pairs/s | requests/s | p50 ms | p99 ms | done | errors | stopped by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:,.1f}"

    for c in report["cases"]:
        rows.append(
            f"| {c['items']} | {c['concurrency']} | {c['pairs_per_s']:,.0f} | {c['requests_per_s']:,.1f} | "
            f"{fmt(c['p50_ms'])} | {fmt(c['p99_ms'])} | {c['completed']}/{c['requested']} | "
            f"{c['errors']} | {c['stopped_by']} |"
        )
    return "\n".join(rows)


def int_list(raw: str) -> tuple[int, ...]:
    return tuple(int(x) for x in raw.split(",") if x.strip())


def add_case_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which cases run and how long: sizes, concurrency, --pairs or --requests,
    the deadline (shared with :mod:`bench.load_compare`); :func:`case_length` reads them back."""
    parser.add_argument("--sizes", type=int_list, default=SIZES, help="items per request (default 10,100)")
    parser.add_argument("--concurrency", type=int_list, default=CONCURRENCY, help="workers (default 1,4,16)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument(
        "--pairs", type=int, default=None,
        help=f"scored pairs per case, the same work at every size (default {PAIRS:,})",
    )  # fmt: skip
    count.add_argument("--requests", type=int, default=None, help="timed requests per case instead")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per case at most")


def case_length(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.pairs`` defaulted to :data:`PAIRS` unless ``--requests`` was given; a usage error
    (exit 2) naming the option when either cannot make a case of every ``--sizes``."""
    if args.requests is None and args.pairs is None:
        args.pairs = PAIRS
    try:
        for n in args.sizes:
            requests_per_case(n, pairs=args.pairs, requests=args.requests)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server (loopback only)")
    add_case_options(parser)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request at most")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before each case")
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    case_length(parser, args)
    token = os.environ.get(args.token_env) if args.token_env else None
    report = run(
        run_load(
            args.url,
            sizes=args.sizes,
            concurrency=args.concurrency,
            requests=args.requests,
            deadline_s=args.deadline,
            timeout_s=args.timeout,
            warmup=args.warmup,
            token=token,
            pairs=args.pairs,
        )
    )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
