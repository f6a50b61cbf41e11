"""The client against a misbehaving completions server: every fault ends in flagged student answers,
within a bounded time, and the circuit breaker opens, half-opens and closes as documented.

The faulty server is a few lines of the standard library's ThreadingHTTPServer on 127.0.0.1 that
counts the requests reaching it, so "nothing was sent" is checked where it matters: server-side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darl_lite import PairScore, RoutingPolicy, Scorer
from darl_lite.errors import InputError
from darl_lite.llm import CircuitBreaker, CircuitOpenError, FallbackError, OpenAIGradeClient

pytest.importorskip("httpx")

ITEMS = ["Mapo doufu", "Afghan cuisine", "Kung Pao chicken"]
PAIRS = [("szechwan cuisine", item) for item in ITEMS]
GOOD_TOP = {"0": -2.0, " 1": -1.0, "▁1": -3.0, "2": -0.5, "x": -0.1}


def _expected_good() -> np.ndarray:
    lp = np.array([-2.0, np.logaddexp(-1.0, -3.0), -0.5])
    e = np.exp(lp - lp.max())
    return e / e.sum()


class FaultServer:
    """A completions endpoint whose behaviour (``mode``) the test switches at will."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.client_ports: set[int] = set()
        self.authorization: list[str | None] = []
        self.release = threading.Event()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with owner._lock:
                    owner.requests += 1
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    owner.client_ports.add(self.client_address[1])
                    owner.authorization.append(self.headers.get("Authorization"))
                try:
                    owner.respond(self)
                finally:
                    with owner._lock:
                        owner.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def respond(self, h: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "hang":
            self.release.wait(10)
            h.close_connection = True
            return
        if mode == "slow":
            time.sleep(0.1)
            mode = "ok"
        if mode == "gated":  # answers once the test opens the gate
            self.gate.wait(10)
            mode = "ok"
        status, body = 200, b""
        if mode == "ok":
            body = _completion({"tokens": ["x"], "top_logprobs": [GOOD_TOP]})
        elif mode == "chat_style":  # newer llama.cpp servers
            entries = [{"token": t, "logprob": v} for t, v in GOOD_TOP.items()]
            body = _completion({"content": [{"token": "x", "logprob": -0.1, "top_logprobs": entries}]})
        elif mode in ("500", "400"):
            status, body = int(mode), b'{"error": {"message": "boom"}}'
        elif mode == "garbage":
            body = b"<html>502 Bad Gateway</html>"
        elif mode == "truncated":
            body = _completion({"top_logprobs": [GOOD_TOP]})[:40]
        elif mode == "no_logprobs":
            body = _completion(None)
        elif mode == "wrong_tokens":
            body = _completion({"top_logprobs": [{"yes": -0.1, "no": -2.3}]})
        elif mode == "nan":
            body = _completion({"top_logprobs": [{"0": float("nan"), "1": -1.0}]})
        elif mode == "cut":  # promises more bytes than it sends, then hangs up
            h.send_response(200)
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(b'{"choices": [')
            h.close_connection = True
            return
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self.release.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _completion(logprobs: Any) -> bytes:
    choice = {"index": 0, "text": "x", "logprobs": logprobs, "finish_reason": "length"}
    return json.dumps({"object": "text_completion", "choices": [choice]}).encode()


@pytest.fixture()
def fault() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.stop()


def _client(fault: FaultServer, **options: Any) -> OpenAIGradeClient:
    defaults: dict[str, Any] = {"timeout_s": 1.0, "retries": 0, "backoff_s": 0.01}
    return OpenAIGradeClient(fault.url, "m", **{**defaults, **options})


@pytest.fixture(scope="module")
def routing_all() -> RoutingPolicy:
    return RoutingPolicy(margin_threshold=1.0)  # every pair is a candidate


@pytest.fixture(scope="module")
def student_answer(tiny_bundle_dir: Path) -> PairScore:
    return Scorer.load(tiny_bundle_dir).score("szechwan cuisine", ITEMS[:1])[0]


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ok", "chat_style"])
def test_both_logprob_layouts_give_the_grade_softmax(fault: FaultServer, mode: str) -> None:
    """Variants of a grade token (" 1", "▁1") add up; other candidates are ignored."""
    fault.mode = mode
    with _client(fault, api_key="k") as client:
        probs = client(PAIRS)
    np.testing.assert_allclose(probs, np.tile(_expected_good(), (3, 1)), atol=1e-12)
    assert fault.requests == 3 and fault.authorization == ["Bearer k"] * 3


@pytest.mark.parametrize(
    ("mode", "why", "attempts"),
    [
        ("500", "HTTP 500", 3),  # retried, then given up
        ("cut", "RemoteProtocolError", 3),  # a transport error: retried
        ("400", "HTTP 400", 1),  # a client error does not heal: not retried
        ("garbage", "body is not JSON", 1),
        ("truncated", "body is not JSON", 1),
        ("no_logprobs", "no logprobs", 1),
        ("wrong_tokens", "none of the grade tokens", 1),
        ("nan", "must be finite", 1),
    ],
)
def test_faults_give_flagged_student_answers(
    tiny_bundle_dir: Path,
    routing_all: RoutingPolicy,
    student_answer: PairScore,
    fault: FaultServer,
    mode: str,
    why: str,
    attempts: int,
) -> None:
    fault.mode = mode
    with _client(fault, retries=2) as client:
        scorer = Scorer.load(tiny_bundle_dir, routing=routing_all, fallback=client)
        start = time.monotonic()
        results = scorer.score("szechwan cuisine", ITEMS[:1])
        elapsed = time.monotonic() - start
    (r,) = results
    assert r.source == "student" and r.routed
    assert r.note.startswith("fallback failed (FallbackError") and why in r.note, r.note
    assert fault.requests == attempts
    assert elapsed < 2.0
    assert r.probabilities == pytest.approx(student_answer.probabilities)


def test_a_hanging_server_costs_at_most_the_timeout_per_attempt(
    tiny_bundle_dir: Path, routing_all: RoutingPolicy, fault: FaultServer
) -> None:
    fault.mode = "hang"
    timeout_s, retries, backoff_s = 0.2, 1, 0.05
    with _client(fault, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s) as client:
        assert client.call_timeout_s == pytest.approx(2 * timeout_s + backoff_s)
        scorer = Scorer.load(tiny_bundle_dir, routing=routing_all, fallback=client)
        start = time.monotonic()
        results = scorer.score("szechwan cuisine", ITEMS)
        elapsed = time.monotonic() - start
        fault.release.set()
    assert all(r.source == "student" and "fallback failed" in r.note for r in results)
    assert ("timed out" in results[0].note) or ("deadline" in results[0].note), results[0].note
    assert elapsed < (retries + 1) * timeout_s + backoff_s + 1.0


def test_the_call_deadline_bounds_a_queue_of_slow_requests(fault: FaultServer) -> None:
    fault.mode = "slow"  # 0.1 s per request, 2 at a time: 20 pairs would need 1 s
    with _client(fault, max_concurrency=2, call_timeout_s=0.35) as client:
        start = time.monotonic()
        with pytest.raises(FallbackError, match="call deadline"):
            client([("q", f"item {i}") for i in range(20)])
        assert time.monotonic() - start < 0.35 + 0.5
    assert fault.requests < 20  # the queued rest were never sent


def test_a_request_cut_short_by_the_call_deadline_reports_the_deadline(fault: FaultServer) -> None:
    fault.mode = "hang"  # never answers: the one attempt's 1 s timeout is cut to the call's 0.3 s
    with (
        _client(fault, timeout_s=1.0, retries=2, call_timeout_s=0.3) as client,
        pytest.raises(FallbackError, match=r"call deadline of 0\.30 s passed") as raised,
    ):
        client(PAIRS[:1])
    assert "timed out after" not in str(raised.value).split("(last attempt")[0]
    assert fault.requests == 1  # no retry once the deadline has passed


def test_concurrency_is_capped_and_connections_are_reused(fault: FaultServer) -> None:
    fault.mode = "slow"
    with _client(fault, max_concurrency=3) as client:
        for _ in range(2):
            assert client([("q", f"item {i}") for i in range(9)]).shape == (9, 3)
    assert fault.requests == 18
    assert fault.max_in_flight == 3
    assert len(fault.client_ports) <= 3  # keep-alive: 18 requests over at most 3 connections


def test_breaker_opens_fails_fast_half_opens_and_closes(
    tiny_bundle_dir: Path, routing_all: RoutingPolicy, fault: FaultServer
) -> None:
    now = [0.0]  # the breaker's clock, moved by hand: no sleeping through its reset timeout
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.3, clock=lambda: now[0])
    fault.mode = "500"
    with _client(fault, breaker=breaker) as client:
        scorer = Scorer.load(tiny_bundle_dir, routing=routing_all, fallback=client)
        for _ in range(2):
            assert scorer.score("q", ITEMS[:1])[0].source == "student"
        assert breaker.state == "open" and fault.requests == 2

        start = time.monotonic()  # open: fail fast, nothing reaches the server
        (r,) = scorer.score("q", ITEMS[:1])
        with pytest.raises(CircuitOpenError, match="next probe in"):
            client(PAIRS)
        assert time.monotonic() - start < 0.2
        assert "CircuitOpenError" in r.note and fault.requests == 2

        now[0] += 0.35  # half-open: one probe; it fails, so the breaker opens again
        assert breaker.state == "half_open"
        with pytest.raises(FallbackError, match="HTTP 500"):
            client(PAIRS)
        assert fault.requests == 3 and breaker.state == "open"

        now[0] += 0.35  # the next probe succeeds: closed, and the call's other pairs follow it
        fault.mode = "ok"
        results = scorer.score("q", ITEMS)
        assert [r.source for r in results] == ["llm"] * 3
        assert breaker.state == "closed" and breaker.consecutive_failures == 0
        assert fault.requests == 6


def test_breaker_lets_exactly_one_probe_through_among_concurrent_callers(fault: FaultServer) -> None:
    now = [0.0]  # the breaker's clock, moved by hand
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.2, clock=lambda: now[0])
    fault.mode = "500"
    with _client(fault, breaker=breaker) as client:
        with pytest.raises(FallbackError):
            client(PAIRS[:1])
        now[0] += 0.25
        fault.mode = "gated"  # the probe is held in flight until every other caller has been refused
        outcomes: list[str] = []
        lock = threading.Lock()

        def call() -> None:
            try:
                client(PAIRS[:1])
                outcome = "ok"
            except CircuitOpenError:
                outcome = "open"
            with lock:
                outcomes.append(outcome)

        callers = [threading.Thread(target=call) for _ in range(6)]
        for t in callers:
            t.start()
        deadline = time.monotonic() + 5
        while len(outcomes) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        fault.gate.set()
        for t in callers:
            t.join(timeout=10)
    assert sorted(outcomes) == ["ok"] + ["open"] * 5
    assert fault.requests == 2 and breaker.state == "closed"


def test_constructor_rejects_bad_settings() -> None:
    cases: list[dict[str, Any]] = [
        {"base_url": "127.0.0.1:8000"},
        {"model": ""},
        {"timeout_s": 0},
        {"retries": -1},
        {"max_concurrency": 0},
        {"top_logprobs": 0},
        {"grade_tokens": "012"},
        {"grade_tokens": ("1", " 1")},
        {"prompt_template": "{query} {item} {oops}"},
    ]
    for case in cases:
        kwargs: dict[str, Any] = {"base_url": "http://127.0.0.1:9", "model": "m", **case}
        with pytest.raises(InputError):
            OpenAIGradeClient(kwargs.pop("base_url"), kwargs.pop("model"), **kwargs)
    with (
        OpenAIGradeClient("http://127.0.0.1:9", "m") as client,
        pytest.raises(InputError, match=r"pairs\[0\]"),
    ):
        client([("only a query",)])  # type: ignore[list-item]


def test_unreachable_server_fails_the_call_with_the_reason() -> None:
    client = OpenAIGradeClient("http://127.0.0.1:9", "m", retries=1, backoff_s=0.01, timeout_s=0.5)
    with client, pytest.raises(FallbackError, match=r"ConnectError.*after 2 attempt"):
        client(PAIRS[:1])


def test_the_runtime_and_the_llm_package_import_neither_httpx_nor_torch() -> None:
    code = (
        "import sys, darl_lite, darl_lite.llm\n"
        "heavy = [m for m in ('httpx', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_httpx_the_client_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['httpx'] = None  # as if the llm extra were not installed\n"
        "from darl_lite.errors import MissingExtraError\n"
        "from darl_lite.llm import OpenAIGradeClient\n"
        "try:\n"
        "    OpenAIGradeClient('http://127.0.0.1:9', 'm')\n"
        "except MissingExtraError as exc:\n"
        "    assert 'darl-lite[llm]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no MissingExtraError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_closing_the_client_during_a_call_fails_that_call_cleanly(fault: FaultServer) -> None:
    """close() from another thread: queued pairs are cancelled, the call raises FallbackError."""
    fault.mode = "gated"
    client = _client(fault, max_concurrency=1, timeout_s=5.0)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            client([("q", f"item {i}") for i in range(4)])
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while fault.requests < 1:
        assert time.monotonic() < deadline, "the call never reached the server"
        time.sleep(0.01)
    closer = threading.Thread(target=client.close)
    closer.start()
    time.sleep(0.1)
    fault.gate.set()  # the one in-flight request finishes; close() then returns
    closer.join(timeout=5)
    caller.join(timeout=5)
    assert len(raised) == 1 and type(raised[0]) is FallbackError, raised
    assert "closed" in str(raised[0])
    assert fault.requests == 1
