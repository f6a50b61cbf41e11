"""bench/load_server.py against a real `darl-lite serve` of the committed tiny bundle, over loopback:
the report's fields, a fixed request count, and a deadline that stops it by itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from bench.load_server import requests_per_case

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "tests" / "fixtures" / "tiny_bundle"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """`darl-lite serve` of the tiny bundle in a subprocess; stopped (and reaped) after the module."""
    port = _free_port()
    cli = Path(sys.executable).with_name("darl-lite")
    proc = subprocess.Popen(
        [str(cli), "serve", str(BUNDLE), "--port", str(port), "--threads", "1"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"darl-lite serve did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _load(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.load_server", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _report(served: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """The JSON report and the printed table of one successful load run against ``served``."""
    out = tmp_path / "load.json"
    done = _load("--url", served, *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


def test_fixed_count_report(served: str, tmp_path: Path) -> None:
    report, table = _report(served, tmp_path, "--sizes", "10", "--concurrency", "1,4", "--requests", "6")
    assert report["url"] == served and report["server_health"]["status"] == "ok"
    assert [(c["items"], c["concurrency"]) for c in report["cases"]] == [(10, 1), (10, 4)]
    for case in report["cases"]:
        assert (case["requested"], case["completed"], case["errors"], case["stopped_by"]) == (
            6,
            6,
            0,
            "count",
        )
        assert case["pairs_per_s"] == pytest.approx(60 / case["wall_s"])
        assert 0 < case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    assert "| 10 | 4 |" in table  # the Markdown table


def test_equal_pairs_per_case_by_default(served: str, tmp_path: Path) -> None:
    """--pairs: every size scores the same number of pairs, so sizes compare on equal work."""
    report, _ = _report(served, tmp_path, "--sizes", "10,20", "--concurrency", "2", "--pairs", "60")
    assert report["settings"]["requests_per_case"] == {"10": 6, "20": 3}
    cases = report["cases"]
    assert [(c["items"], c["requested"], c["completed"], c["errors"]) for c in cases] == [
        (10, 6, 6, 0),
        (20, 3, 3, 0),
    ]
    assert {c["items"] * c["completed"] for c in cases} == {60}


def test_requests_per_case() -> None:
    assert requests_per_case(10, pairs=20_000, requests=None) == 2000
    assert requests_per_case(100, pairs=20_000, requests=None) == 200
    assert requests_per_case(1000, pairs=100, requests=None) == 1  # at least one request
    assert requests_per_case(100, pairs=None, requests=7) == 7
    for items, pairs, requests, named in (
        (10, 0, None, "--pairs"),
        (10, None, 0, "--requests"),
        (10, 5, 5, "exactly one"),
        (10, None, None, "exactly one"),
        (0, 5, None, "request size"),
    ):
        with pytest.raises(ValueError, match=named):
            requests_per_case(items, pairs=pairs, requests=requests)


def test_refuses_pairs_and_requests_together_and_nonsense_counts() -> None:
    assert _load("--pairs", "10", "--requests", "10", timeout=60).returncode == 2
    refused = _load("--pairs", "0", timeout=60)
    assert refused.returncode == 2 and "--pairs must be >= 1" in refused.stderr


def test_deadline_stops_it(served: str, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    started = time.monotonic()
    done = _load(
        "--url", served, "--sizes", "100", "--concurrency", "4", "--requests", "100000",
        "--deadline", "1.5", "--warmup", "0", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    (case,) = json.loads(out.read_text())["cases"]
    assert case["stopped_by"] == "deadline" and 0 < case["completed"] < 100000
    assert 1.5 <= case["wall_s"] < 5 and case["errors"] == 0


def test_refuses_a_host_that_is_not_loopback() -> None:
    done = _load("--url", "http://10.1.2.3:8080", timeout=60)
    assert done.returncode == 2
    assert "loopback only" in done.stderr


def test_peer_server_speaks_the_same_shape(tiny_student_dir: Path, tmp_path: Path) -> None:
    """The peer (ST's own int8 export of the tiny student, its CPU's preset) under the same load generator."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    from uvicorn_thread import serve_in_thread

    from bench.common import st_int8_file
    from bench.load_server import run_load
    from bench.peer_server import create_peer_app, load_peer_model

    model = load_peer_model(tiny_student_dir, tmp_path / "work", threads=1, max_length=32)
    st_dir = tmp_path / "work" / "st_student"
    assert (st_dir / st_int8_file(st_dir)).is_file()
    server = cast(Generator[str, None, None], serve_in_thread(create_peer_app(model)))
    url = next(server)
    try:
        bad = httpx.post(f"{url}/score", json={"query": "q", "items": "one item"}, timeout=10)
        assert bad.status_code == 422 and "list of strings" in bad.json()["detail"]
        one = httpx.post(
            f"{url}/score", json={"query": "szechwan cuisine", "items": ["Mapo doufu"]}, timeout=30
        )
        (row,) = one.json()["results"]
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5) and row["grade"] in (0, 1, 2)
        report = asyncio.run(run_load(url, sizes=(10,), concurrency=(2,), requests=4, deadline_s=60))
        (case,) = report["cases"]
        assert (case["completed"], case["errors"], case["stopped_by"]) == (4, 0, "count")
    finally:
        server.close()


def test_the_client_reads_chunked_answers_and_reopens_closed_connections() -> None:
    """bench.load_server's HTTP/1.1 client against a loopback server that answers in chunks and
    closes every connection after one answer (as a server at its keep-alive limit does)."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    from bench.load_server import HTTPConnection

    opened = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")
        )
        body = await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(body), body)
            + b"0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def go() -> list[tuple[int, bytes]]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = HTTPConnection("127.0.0.1", port)
        try:
            return [
                await connection.send(connection.message("POST", "/score", b'{"n": %d}' % k))
                for k in range(3)
            ]
        finally:
            connection.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(go()) == [(200, b'{"n": %d}' % k) for k in range(3)]
    assert opened == 3


def test_every_request_size_scores_slices_of_the_same_items() -> None:
    from bench.load_server import request_slices

    items = [f"item {i}" for i in range(100)]
    tens = request_slices(items, 10)
    assert len(tens) == 10 and [item for ten in tens for item in ten] == items
    assert request_slices(items, 100) == [items]
    assert request_slices(items, 30) == [items[0:30], items[30:60], items[60:90]]
    with pytest.raises(ValueError):
        request_slices(items, 0)
