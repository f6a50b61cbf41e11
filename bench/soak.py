"""Soak benchmark: hold a bounded load on the runtime (threads) or the HTTP API (loopback) for minutes.

    python -m bench.soak --bundle darl-lite-run/bundle --seconds 120 --threads 8
    python -m bench.soak --bundle darl-lite-run/bundle --seconds 120 --threads 8 --http

Threads mode: ``--threads`` workers share one :class:`~darl_lite.Scorer` and call ``score`` back to
back. HTTP mode: the ``darl-lite serve`` app (``create_app`` + uvicorn, as ``serve`` builds it) runs
in this process on 127.0.0.1 (an ephemeral port, loopback only), and ``--threads`` closed-loop httpx
clients (one keep-alive connection each, so at most ``--threads`` requests in flight) POST to
``/score``. Requests are real DBpedia-Entity queries with ``--items`` of their items each.

The load is bounded in time (``--seconds``) and in count (``--max-requests``). Recorded: requests and
pairs per second, latency p50/p90/p99/max, errors (an exception, a non-200 answer or a wrong result
count; must be 0), and the process RSS sampled every second: at the end of the warm-up, at the end,
the peak, at mid-run, the growth and the slope over the second half (must be flat). Latencies go into a buffer
allocated and touched before the run, so recording them does not itself grow the RSS. In HTTP
mode the RSS is that of server and clients together (one process). Writes JSON (``--out``) and exits
1 when there were errors or the RSS grew more than ``--max-rss-growth-mb``.

Not a pytest-benchmark test and not part of CI: it takes minutes and wants an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite import Scorer, SessionConfig
from darl_lite.datasets import load_dbpedia

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def workload(n_items: int, fold: int = 0) -> list[tuple[str, list[str]]]:
    """``(query, items)`` requests from every shipped split: real text, real lengths, all query kinds."""
    splits = load_dbpedia(fold=fold)
    by_query: dict[str, list[str]] = {}
    for pair in splits.all_pairs():
        by_query.setdefault(pair.query, []).append(pair.item)
    return [(query, items[:n_items]) for query, items in sorted(by_query.items()) if len(items) >= n_items]


class RssSampler(threading.Thread):
    """Samples the RSS every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_bytes()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.samples.append((time.monotonic() - self._t0, rss_bytes()))


def drive(
    call: Callable[[int, tuple[str, list[str]]], int],
    requests: Sequence[tuple[str, list[str]]],
    *,
    threads: int,
    seconds: float,
    warmup: float,
    max_requests: int,
) -> dict[str, Any]:
    """Run ``call(worker, request) -> pairs`` from ``threads`` workers; bounded in time and count.

    Warm-up requests (the first ``warmup`` seconds) are not measured; the RSS baseline is taken
    when the warm-up ends.
    """
    latencies = np.full(max_requests, np.nan)  # touched now: filling it later costs no new pages
    ticket = itertools.count()  # next() on a count is atomic under the GIL
    errors: list[str] = []
    error_lock = threading.Lock()
    pairs_done = [0] * threads
    measuring = threading.Event()
    stop = threading.Event()

    def worker(w: int) -> None:
        for k in itertools.count(w):
            if stop.is_set():
                return
            request = requests[k % len(requests)]
            started = time.perf_counter()
            try:
                pairs = call(w, request)
            except Exception as exc:  # counted and reported, never fatal to the soak
                pairs = -1
                with error_lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
            elapsed = time.perf_counter() - started
            if not measuring.is_set():
                continue
            if pairs >= 0:
                pairs_done[w] += pairs
            index = next(ticket)
            if index >= max_requests:
                stop.set()
                return
            latencies[index] = elapsed

    sampler = RssSampler()
    sampler.start()
    workers = [threading.Thread(target=worker, args=(w,), name=f"soak-{w}") for w in range(threads)]
    for t in workers:
        t.start()
    time.sleep(warmup)
    rss_start = rss_bytes()
    measuring.set()
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in workers:
        t.join(60)
    wall = time.perf_counter() - t0
    sampler.stop()
    rss_end = rss_bytes()

    done = latencies[~np.isnan(latencies)]
    n = int(done.size)
    measured = [(t, r) for t, r in sampler.samples if t >= warmup]
    half = [(t, r) for t, r in measured if t >= warmup + wall / 2]
    slope = float(np.polyfit([t for t, _ in half], [r for _, r in half], 1)[0]) if len(half) >= 3 else 0.0
    mb = 1 / 2**20
    return {
        "requests": n,
        "pairs": int(sum(pairs_done)),
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 2) if wall else 0.0,
        "pairs_per_s": round(sum(pairs_done) / wall, 1) if wall else 0.0,
        "latency_ms": {
            q: round(float(np.percentile(done, p)) * 1e3, 2) if n else None
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "errors": len(errors),
        "error_samples": errors[:5],
        "rss_mb": {
            "start": round(rss_start * mb, 1),
            "end": round(rss_end * mb, 1),
            "peak": round(max((r for _, r in measured), default=rss_end) * mb, 1),
            "mid": round(
                min(measured, key=lambda s: abs(s[0] - warmup - wall / 2), default=(0, rss_end))[1] * mb, 1
            ),
            "growth": round((rss_end - rss_start) * mb, 1),
            "slope_second_half_mb_per_min": round(slope * 60 * mb, 2),
        },
        "rss_samples_mb": [
            [round(t, 1), round(r * mb, 1)] for t, r in sampler.samples[:: max(1, len(sampler.samples) // 60)]
        ],
    }


def _threads_mode(
    scorer: Scorer, args: argparse.Namespace, requests: Sequence[tuple[str, list[str]]]
) -> dict[str, Any]:
    def call(_worker: int, request: tuple[str, list[str]]) -> int:
        query, items = request
        results = scorer.score(query, items)
        if len(results) != len(items):
            raise RuntimeError(f"{len(results)} results for {len(items)} items")
        return len(results)

    return drive(
        call,
        requests,
        threads=args.threads,
        seconds=args.seconds,
        warmup=args.warmup,
        max_requests=args.max_requests,
    )


def _http_mode(
    scorer: Scorer, args: argparse.Namespace, requests: Sequence[tuple[str, list[str]]]
) -> dict[str, Any]:
    import httpx
    import uvicorn

    from darl_lite.serve import create_app

    app = create_app(scorer, max_items=max(len(items) for _, items in requests))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # loopback only, ephemeral port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.Client(base_url=base, timeout=60, limits=limits) for _ in range(args.threads)]

    def call(worker: int, request: tuple[str, list[str]]) -> int:
        query, items = request
        response = clients[worker].post("/score", json={"query": query, "items": items})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        n = len(response.json()["results"])
        if n != len(items):
            raise RuntimeError(f"{n} results for {len(items)} items")
        return n

    try:
        result = drive(
            call,
            requests,
            threads=args.threads,
            seconds=args.seconds,
            warmup=args.warmup,
            max_requests=args.max_requests,
        )
        metrics = clients[0].get("/metrics").text
        result["server_requests_by_status"] = {
            line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("darl_lite_requests_total{")
        }
        result["url"] = base
    finally:
        for client in clients:
            client.close()
        server.should_exit = True
        thread.join(30)
        sock.close()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", required=True, help="bundle directory (read only)")
    parser.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured duration (default 120)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured warm-up seconds (default 5)")
    parser.add_argument(
        "--threads", type=int, default=8, help="concurrent workers / HTTP clients (default 8)"
    )
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--items", type=int, default=20, help="items per request (default 20)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--max-rss-growth-mb", type=float, default=32.0, help="fail above this RSS growth")
    parser.add_argument("--http", action="store_true", help="drive the HTTP API on 127.0.0.1 instead")
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.seconds <= 0 or args.max_requests < 1 or args.items < 1 or args.warmup < 0:
        print("soak: --threads, --seconds, --max-requests and --items must be positive", file=sys.stderr)
        return 2
    requests = workload(args.items)
    if not requests:
        print(f"soak: no query has {args.items} items; lower --items", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    scorer = Scorer.load(
        args.bundle, precision=args.precision, session=SessionConfig(intra_op_threads=args.ort_threads)
    )
    result = (_http_mode if args.http else _threads_mode)(scorer, args, requests)
    report = {
        "mode": "http" if args.http else "threads",
        "bundle": str(Path(args.bundle).resolve()),
        "precision": args.precision,
        "threads": args.threads,
        "ort_intra_op_threads": args.ort_threads,
        "items_per_request": args.items,
        "distinct_requests": len(requests),
        "seconds": args.seconds,
        **result,
        "rss_flat": result["rss_mb"]["growth"] <= args.max_rss_growth_mb,
        "max_rss_growth_mb": args.max_rss_growth_mb,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if report["errors"] == 0 and report["rss_flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
