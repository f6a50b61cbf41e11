"""A server under concurrent load: a bounded asyncio client for anything that speaks darl-lite's ``/score``.

    darl-lite serve darl-lite-run/bundle --port 8080 --threads 2 &          # or: python -m bench.peer_server
    python -m bench.load_server --url http://127.0.0.1:8080 --out bench/results/load_darl.json

Each case is one request size × one concurrency: ``--requests`` requests of one real id_test query
with 10 (or 100) distinct real id_test items (``bench.common.latency_requests``), sent by
``concurrency`` workers that each keep one request in flight, after ``--warmup`` untimed requests.
A case stops when its requests are done or at ``--deadline`` seconds, whichever comes first
(in-flight requests are then cancelled and not counted); every request has ``--timeout`` too. A
response counts only when it is 200 with one result per item. Reported per case: throughput
(scored pairs per second of wall time), requests per second, p50 / p99 / max latency, errors and
what stopped it. Loopback only: the client refuses any other host (the client shares the server's
cores, which the figures include; say so beside them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SIZES: tuple[int, ...] = (10, 100)
CONCURRENCY: tuple[int, ...] = (1, 4, 16)


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


async def run_case(
    client: Any,
    query: str,
    items: list[str],
    concurrency: int,
    requests: int,
    deadline_s: float,
    warmup: int = 2,
) -> CaseResult:
    """Send ``requests`` POST /score requests from ``concurrency`` workers, stopping at ``deadline_s``."""
    if concurrency < 1 or requests < 1 or deadline_s <= 0:
        raise ValueError("concurrency and requests must be >= 1 and the deadline > 0")
    body = {"query": query, "items": items}
    for _ in range(warmup):
        await client.post("/score", json=body)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            started = time.perf_counter()
            problem = await _one(client, body, len(items))
            if problem is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(problem)

    started = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    ms = [x * 1e3 for x in latencies]
    return CaseResult(
        items=len(items),
        concurrency=concurrency,
        requested=requests,
        completed=len(latencies),
        errors=len(errors),
        stopped_by="deadline" if pending else "count",
        wall_s=wall,
        pairs_per_s=len(latencies) * len(items) / wall,
        requests_per_s=len(latencies) / wall,
        p50_ms=_percentile(ms, 50),
        p99_ms=_percentile(ms, 99),
        max_ms=max(ms) if ms else None,
        first_error=errors[0] if errors else None,
    )


async def _one(client: Any, body: dict[str, Any], n_items: int) -> str | None:
    """None when the server answered 200 with one result per item; else what went wrong."""
    import httpx

    try:
        response = await client.post("/score", json=body)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    results = response.json().get("results")
    if not isinstance(results, list) or len(results) != n_items:
        return f"expected {n_items} results, got {type(results).__name__} of {len(results or [])}"
    return None


async def run_load(
    url: str,
    *,
    sizes: tuple[int, ...] = SIZES,
    concurrency: tuple[int, ...] = CONCURRENCY,
    requests: int = 200,
    deadline_s: float = 60.0,
    timeout_s: float = 30.0,
    warmup: int = 2,
    token: str | None = None,
) -> dict[str, Any]:
    """Every size × concurrency case against ``url``, one after the other; JSON-ready."""
    import httpx

    from bench.common import latency_requests

    base = check_loopback(url)
    real = latency_requests(tuple(sorted(set(sizes))))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    cases: list[CaseResult] = []
    health: Any = None
    for n in sizes:
        query, items = real[n]
        for c in concurrency:
            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            async with httpx.AsyncClient(
                base_url=base, headers=headers, timeout=timeout_s, limits=limits
            ) as client:
                if health is None:
                    answer = await client.get("/healthz")
                    health = answer.json() if answer.status_code == 200 else {"status": answer.status_code}
                cases.append(await run_case(client, query, items, c, requests, deadline_s, warmup))
    return {
        "url": base,
        "server_health": health,
        "load_average_before": os.getloadavg()[0],
        "settings": {
            "requests": requests,
            "deadline_s": deadline_s,
            "timeout_s": timeout_s,
            "warmup": warmup,
        },
        "cases": [asdict(c) for c in cases],
    }


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


def _ints(raw: str) -> tuple[int, ...]:
    return tuple(int(x) for x in raw.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server (loopback only)")
    parser.add_argument("--sizes", type=_ints, default=SIZES, help="items per request (default 10,100)")
    parser.add_argument("--concurrency", type=_ints, default=CONCURRENCY, help="workers (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per case")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds per case at most")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request at most")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before each case")
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    token = os.environ.get(args.token_env) if args.token_env else None
    report = asyncio.run(
        run_load(
            args.url,
            sizes=args.sizes,
            concurrency=args.concurrency,
            requests=args.requests,
            deadline_s=args.deadline,
            timeout_s=args.timeout,
            warmup=args.warmup,
            token=token,
        )
    )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
