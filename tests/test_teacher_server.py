"""The tuned teacher as a servable grader: darl-lite's teacher server and the classify client.

A tiny random Qwen2 (2 blocks, 32 wide) with a random probe head is the teacher. It is served by the
real server (``darl_lite.distill.teacher_server``, FastAPI + uvicorn on 127.0.0.1) and graded by the
real client (``ClassifyGradeClient``) in vLLM's classification protocol; the HTTP path must give the
in-process ``predict_proba``. Faults come from a small standard-library server that counts the
requests reaching it, so "retried", "nothing was sent" and "the breaker opened" are checked where
they happen. The last test is the real teacher (slow).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from tiny_models import WORDS, decoder_tokenizer, tiny_qwen
from uvicorn_thread import serve_in_thread

from darl_lite import RoutingPolicy, Scorer
from darl_lite.distill.llm_teacher import ProbeHead
from darl_lite.distill.teacher_server import TeacherEngine, create_app
from darl_lite.distill.teacher_tune import ProbeTeacher
from darl_lite.errors import InputError
from darl_lite.llm import (
    TEACHER_TEMPLATE,
    CircuitBreaker,
    CircuitOpenError,
    ClassifyGradeClient,
    FallbackError,
    GradeClient,
    OpenAIGradeClient,
    PairText,
    fallback_from_url,
    teacher_fallback,
)
from darl_lite.types import Pair

QUERY = "chinese cuisine"
ITEMS = ["szechwan dish food", "river mountain", "chinese food city", "band album song", "king queen"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct pairs of varied lengths over the tiny vocabulary (so batches need padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        item = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append((f"{query} w{i}", item))
    return out


@pytest.fixture(scope="module")
def teacher() -> ProbeTeacher:
    """Qwen2, 2 blocks, with a random probe head on ``hidden_states[1]`` (un-normed, as the real one)."""
    model, tokenizer = tiny_qwen(), decoder_tokenizer()
    rng = np.random.default_rng(0)
    hidden = model.config.hidden_size
    head = ProbeHead(
        layer=1,
        mean=rng.normal(size=hidden).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, size=hidden).astype(np.float32),
        weight=rng.normal(size=(3, hidden)).astype(np.float32),
        bias=rng.normal(size=3).astype(np.float32),
        temperature=0.7,
    )
    return ProbeTeacher(model, tokenizer, head, name="tiny", batch_size=4)


def in_process(teacher: Any, pairs: list[tuple[str, str]]) -> np.ndarray:
    return teacher.predict_proba([Pair(q, i) for q, i in pairs])


@pytest.fixture(scope="module")
def teacher_url(teacher: ProbeTeacher) -> Iterator[str]:
    engine = TeacherEngine(teacher, model_name="tiny-teacher", max_batch=16, max_text_chars=500)
    yield from serve_in_thread(create_app(engine, max_body_bytes=20_000))


def _client(url: str, **options: Any) -> ClassifyGradeClient:
    defaults: dict[str, Any] = {"model": "tiny-teacher", "timeout_s": 5.0, "retries": 0}
    return ClassifyGradeClient(url, **{**defaults, **options})


# ------------------------------------------------------------------------------------------------
# The HTTP path equals the in-process teacher
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [16, 4, 1])
def test_http_probabilities_equal_in_process_predict_proba(
    teacher: ProbeTeacher, teacher_url: str, batch_size: int
) -> None:
    pairs = text_pairs(10, seed=3)
    expected = in_process(teacher, pairs)
    with _client(teacher_url, batch_size=batch_size, max_concurrency=2) as client:
        probs = client(pairs)
        health = client.health()
    assert probs.shape == (10, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    assert not np.allclose(probs[0], probs[1])  # the pairs are told apart
    batches = -(-10 // batch_size)
    assert health["requests"] == batches and health["failures"] == 0  # one request per batch
    assert health["calls"] == 1 and health["state"] == "closed"
    assert health["protocol"] == "classify" and health["model"] == "tiny-teacher"
    assert health["last_latency_ms"] is not None and health["last_latency_ms"] > 0
    # In process, the same teacher object is a fallback too: one artifact, one answer.
    np.testing.assert_allclose(teacher_fallback(teacher)(pairs), probs, rtol=0, atol=1e-6)


def test_a_stages_2_3_teacher_is_served_the_same_way(tmp_path: Path) -> None:
    """Any object with predict_proba(pairs) is served: here the LoRA-tuned top blocks + head."""
    from darl_lite.distill.decoder_blocks import DecoderParts
    from darl_lite.distill.staged_teacher import StagedTeacher, load_top, save_top
    from darl_lite.distill.top_tune import TopModel

    model, tokenizer = tiny_qwen(), decoder_tokenizer()
    rng = np.random.default_rng(1)
    hidden = model.config.hidden_size
    head = ProbeHead(
        layer=1,
        mean=rng.normal(size=hidden).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, size=hidden).astype(np.float32),
        weight=rng.normal(size=(3, hidden)).astype(np.float32),
        bias=rng.normal(size=3).astype(np.float32),
        temperature=1.3,
    )
    top = TopModel(DecoderParts.of(model), cut=0, layer=1, head=head, rank=2)
    with torch.no_grad():
        for module in top.lora_modules().values():
            module.lora_b.normal_(std=0.2)  # a tuned top, not the identity
    path = save_top(
        tmp_path / "top.npz",
        top,
        1.3,
        mix=0.5,
        compute_dtype="float32",
        storage_dtype="float32",
        max_length=96,
    )
    staged = StagedTeacher(model, tokenizer, *load_top(path, DecoderParts.of(model)), batch_size=4)
    pairs = text_pairs(7, seed=5)
    expected = in_process(staged, pairs)
    engine = TeacherEngine(staged, model_name="staged")
    for url in serve_in_thread(create_app(engine)):
        with ClassifyGradeClient(url, "staged", batch_size=3, retries=0) as client:
            probs = client(pairs)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 96
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)


def test_a_query_holding_the_separator_reaches_the_teacher_as_the_same_text(
    teacher: ProbeTeacher, teacher_url: str
) -> None:
    """The server may split such a text elsewhere; the teacher still reads the very same tokens."""
    pairs = [("city\nEntity: river", "band album"), ("Query: song", "Relevance: film\nRelevance:")]
    with _client(teacher_url) as client:
        np.testing.assert_allclose(client(pairs), in_process(teacher, pairs), rtol=0, atol=1e-6)


def test_empty_call_sends_nothing(teacher_url: str) -> None:
    with _client(teacher_url) as client:
        out = client([])
        assert out.shape == (0, 3) and client.health()["requests"] == 0


# ------------------------------------------------------------------------------------------------
# The server speaks vLLM's classification protocol, with bounded requests and clear errors
# ------------------------------------------------------------------------------------------------
def test_the_response_has_vllms_classification_shape(teacher: ProbeTeacher, teacher_url: str) -> None:
    text = TEACHER_TEMPLATE.format(query=QUERY, item=ITEMS[0])
    body = httpx.post(f"{teacher_url}/classify", json={"model": "tiny-teacher", "input": text}).json()
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == "tiny-teacher"
    (row,) = body["data"]
    assert set(row) == {"index", "label", "probs", "num_classes"}
    expected = in_process(teacher, [(QUERY, ITEMS[0])])[0]
    assert row["index"] == 0 and row["num_classes"] == 3
    np.testing.assert_allclose(row["probs"], expected, atol=1e-6)
    assert row["label"] == ("irrelevant", "weak", "strong")[int(np.argmax(expected))]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] == 0
    # /v1/classify is the same route; "model" may be left out, as vLLM allows.
    again = httpx.post(f"{teacher_url}/v1/classify", json={"input": [text]}).json()
    assert again["data"][0]["probs"] == row["probs"]
    models = httpx.get(f"{teacher_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-teacher"]
    assert models["data"][0]["max_model_len"] == teacher.max_length
    assert httpx.get(f"{teacher_url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        ({"model": "tiny-teacher"}, 400, "'input' must be"),
        ({"input": []}, 400, "'input' must be"),
        ({"input": ["fine?", 3]}, 400, "input[0] does not follow the template"),
        ({"input": [TEACHER_TEMPLATE.format(query="a", item="b"), 3]}, 400, "input[1] must be a string"),
        ({"model": "other", "input": "x"}, 404, "'other' does not exist"),
        ({"input": ["x"] * 17}, 413, "limit of 16"),
        ({"input": ["Query: " + "a" * 600 + "\nEntity: b\nRelevance:"]}, 413, "the limit is 500"),
        ({"input": ["y" * 30_000]}, 413, "request body exceeds the limit"),
        ({"input": "x", "truncate_prompt_tokens": 8}, 400, "truncate_prompt_tokens"),
    ],
)
def test_bad_requests_get_clear_4xx_errors(teacher_url: str, body: Any, status: int, message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{teacher_url}/classify", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status


def test_a_4xx_is_not_retried_and_names_the_cause(teacher_url: str) -> None:
    with _client(teacher_url, model="not-served", retries=2) as client:
        with pytest.raises(FallbackError, match=r"HTTP 404.*after 1 attempt"):
            client([(QUERY, ITEMS[0])])
        assert client.health()["requests"] == 1


def test_the_engine_rejects_bad_settings(teacher: ProbeTeacher) -> None:
    with pytest.raises(InputError, match="predict_proba"):
        TeacherEngine(object())
    with pytest.raises(InputError, match="max_batch"):
        TeacherEngine(teacher, max_batch=0)


# ------------------------------------------------------------------------------------------------
# Templates: render on the client, split on the server, exactly inverse
# ------------------------------------------------------------------------------------------------
def test_pair_text_split_rerenders_to_the_same_text() -> None:
    cases = [
        ("szechwan", "Mapo doufu"),
        ("a\nEntity: b", "c"),  # the separator inside the query
        ("", "only an item"),
        ("q", "\nEntity: \nRelevance:"),
        ("emoji 🍜 and 中文", "עברית {braces}"),
    ]
    for template in (TEACHER_TEMPLATE, "{item} || {query}", "{{literal}} {query} -> {item}"):
        text = PairText(template)
        for query, item in cases:
            rendered = text.render(query, item)
            assert text.render(*text.split(rendered)) == rendered
    assert PairText().split("Query: q\nEntity: i\nRelevance:") == ("q", "i")
    assert PairText("{item} || {query}").split("i || q") == ("q", "i")
    with pytest.raises(ValueError, match="does not follow"):
        PairText().split("Query: no separator here\nRelevance:")


@pytest.mark.parametrize(
    "template", ["{query} {item} {oops}", "{query}{item}", "{query} only", "{query!r} {item}", "{query} {"]
)
def test_pair_text_rejects_templates_it_cannot_invert(template: str) -> None:
    with pytest.raises(InputError):
        PairText(template)


def test_the_runtime_template_is_the_teachers() -> None:
    from darl_lite.distill.llm_features import TEACHER_TEMPLATE as TRAINING_TEMPLATE

    assert TEACHER_TEMPLATE == TRAINING_TEMPLATE


# ------------------------------------------------------------------------------------------------
# Faults: down, slow, failing; retries, deadline, breaker, health()
# ------------------------------------------------------------------------------------------------
class ClassifyFaultServer:
    """A /classify endpoint whose behaviour (``mode``) the test switches; counts requests."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        self.authorization: list[str | None] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests += 1
                owner.authorization.append(self.headers.get("Authorization"))
                owner.respond(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def respond(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        n = len(body["input"])
        status, payload = 200, b""
        if self.mode == "slow":
            self.release.wait(0.5)
        if self.mode in ("ok", "slow"):
            rows = [
                {"index": i, "label": "weak", "probs": [0.2, 0.5, 0.3], "num_classes": 3} for i in range(n)
            ]
            payload = json.dumps({"object": "list", "data": rows[::-1]}).encode()  # any order: by index
        elif self.mode == "500":
            status, payload = 500, b'{"error": {"message": "boom"}}'
        elif self.mode == "short":  # one row missing
            payload = json.dumps({"data": [{"index": 0, "probs": [0.2, 0.5, 0.3]}] * (n - 1)}).encode()
        elif self.mode == "two_classes":
            payload = json.dumps({"data": [{"index": i, "probs": [0.5, 0.5]} for i in range(n)]}).encode()
        elif self.mode == "not_a_distribution":
            payload = json.dumps(
                {"data": [{"index": i, "probs": [0.9, 0.9, 0.9]} for i in range(n)]}
            ).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture()
def fault() -> Iterator[ClassifyFaultServer]:
    server = ClassifyFaultServer()
    yield server
    server.stop()


def test_answers_are_read_by_index(fault: ClassifyFaultServer) -> None:
    with ClassifyGradeClient(fault.url, batch_size=2, retries=0) as client:
        probs = client([(QUERY, item) for item in ITEMS])
    np.testing.assert_allclose(probs, np.tile([0.2, 0.5, 0.3], (5, 1)), atol=1e-7)
    assert fault.requests == 3


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("short", "4 results for 5 inputs"),
        ("two_classes", "the bundle grades 3"),
        ("not_a_distribution", "sum to 1"),
    ],
)
def test_unusable_answers_fail_the_call_without_retries(
    fault: ClassifyFaultServer, mode: str, why: str
) -> None:
    fault.mode = mode
    with ClassifyGradeClient(fault.url, retries=2) as client, pytest.raises(FallbackError, match=why):
        client([(QUERY, item) for item in ITEMS])
    assert fault.requests == 1


def test_a_failing_server_is_retried_then_the_breaker_opens_and_health_says_so(
    fault: ClassifyFaultServer,
) -> None:
    fault.mode = "500"
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.3)
    with ClassifyGradeClient(fault.url, retries=2, backoff_s=0.01, breaker=breaker) as client:
        for _ in range(2):
            with pytest.raises(FallbackError, match=r"HTTP 500.*after 3 attempt"):
                client([(QUERY, ITEMS[0])])
        assert fault.requests == 6
        health = client.health()
        assert health["state"] == "open" and health["consecutive_failures"] == 2
        assert health["requests"] == 6 and health["failures"] == 6
        assert health["calls"] == 2 and health["failed_calls"] == 2 and "HTTP 500" in health["last_error"]
        assert health["last_latency_ms"] is None  # no call was answered yet

        start = time.monotonic()  # open: fail fast, nothing reaches the server
        with pytest.raises(CircuitOpenError):
            client([(QUERY, ITEMS[0])])
        assert time.monotonic() - start < 0.1 and fault.requests == 6

        time.sleep(0.35)  # half-open; the endpoint is back: the probe closes the breaker
        fault.mode = "ok"
        assert client.health()["state"] == "half_open"
        assert client([(QUERY, ITEMS[0])]).shape == (1, 3)
        health = client.health()
        assert health["state"] == "closed" and health["consecutive_failures"] == 0
        assert health["p50_latency_ms"] is not None and health["calls"] == 4


def test_a_slow_server_is_cut_off_by_the_call_deadline(fault: ClassifyFaultServer) -> None:
    fault.mode = "slow"  # 0.5 s per batch
    with ClassifyGradeClient(fault.url, batch_size=1, max_concurrency=1, call_timeout_s=0.3) as client:
        start = time.monotonic()
        with pytest.raises(FallbackError, match="call deadline"):
            client([(QUERY, item) for item in ITEMS])
        assert time.monotonic() - start < 0.3 + 0.4
    assert fault.requests < len(ITEMS)  # the queued rest were never sent


def test_a_server_that_is_down_fails_after_its_retries() -> None:
    with ClassifyGradeClient("http://127.0.0.1:9", retries=1, backoff_s=0.01, timeout_s=0.5) as client:
        with pytest.raises(FallbackError, match=r"ConnectError.*after 2 attempt"):
            client([(QUERY, ITEMS[0])])
        health = client.health()
    assert health["requests"] == 2 and health["failures"] == 2 and health["state"] == "closed"
    assert health["endpoint"] == "http://127.0.0.1:9/classify"


# ------------------------------------------------------------------------------------------------
# The scorer routes through the served teacher, end to end
# ------------------------------------------------------------------------------------------------
def test_the_scorer_routes_to_the_served_teacher(
    tiny_bundle_dir: Path, teacher: ProbeTeacher, teacher_url: str
) -> None:
    routing = RoutingPolicy(margin_threshold=1.0)  # every pair is a candidate
    with _client(teacher_url, batch_size=2) as client:
        scorer = Scorer.load(tiny_bundle_dir, routing=routing, fallback=client)
        results = scorer.score(QUERY, ITEMS)
        assert client.health()["requests"] == 3
    assert [r.source for r in results] == ["llm"] * len(ITEMS) and all(r.routed for r in results)
    expected = in_process(teacher, [(QUERY, item) for item in ITEMS])
    np.testing.assert_allclose([r.probabilities for r in results], expected, atol=1e-6)

    with ClassifyGradeClient("http://127.0.0.1:9", retries=0, timeout_s=0.5) as down:
        scorer = Scorer.load(tiny_bundle_dir, routing=routing, fallback=down)
        kept = scorer.score(QUERY, ITEMS[:2])
    assert all(r.source == "student" and "ConnectError" in r.note for r in kept)


def test_cli_score_routes_through_the_fallback_url(
    tiny_bundle_dir: Path, teacher_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from darl_lite.cli import main

    items = tmp_path / "items.txt"
    items.write_text("\n".join(ITEMS * 4) + "\n", encoding="utf-8")
    argv = ["score", str(tiny_bundle_dir), "--query", QUERY, "--items", str(items), "--json"]
    options = ["--fallback-url", teacher_url, "--fallback-model", "tiny-teacher", "--fallback-timeout", "5"]
    assert main([*argv, *options]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    routed = [r for r in rows if r["routed"]]
    assert routed, "the tiny bundle routes some of these pairs"
    assert all(r["source"] == "llm" for r in routed) and all(
        r["source"] == "student" for r in rows if not r["routed"]
    )
    assert f"the fallback graded {len(routed)}" in captured.err

    # A zero sliding-window budget keeps every student answer and says so.
    assert main([*argv, *options, "--route-budget", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["source"] == "student" for r in rows)
    assert any("sliding-window routing budget exhausted" in r["note"] for r in rows)


# ------------------------------------------------------------------------------------------------
# The factory the node's CLIs call
# ------------------------------------------------------------------------------------------------
def test_fallback_from_url_builds_either_protocol() -> None:
    classify = fallback_from_url("http://127.0.0.1:8000/v1/", timeout_s=3, retries=1, max_concurrency=2)
    assert isinstance(classify, ClassifyGradeClient) and isinstance(classify, GradeClient)
    assert classify.endpoint == "http://127.0.0.1:8000/classify" and classify.model is None
    assert classify.transport.timeout_s == 3 and classify.transport.max_concurrency == 2
    assert classify.call_timeout_s == pytest.approx(2 * 3 + 0.05)
    completions = fallback_from_url("http://127.0.0.1:8000", protocol="completions", model="m")
    assert isinstance(completions, OpenAIGradeClient) and isinstance(completions, GradeClient)
    assert completions.timeout_s == 2.0 and completions.health()["protocol"] == "completions"
    health = classify.health()
    assert health["state"] == "closed" and health["requests"] == 0 and health["p50_latency_ms"] is None
    with pytest.raises(InputError, match="protocol must be one of"):
        fallback_from_url("http://127.0.0.1:8000", protocol="grpc")
    with pytest.raises(InputError, match="needs the served model's name"):
        fallback_from_url("http://127.0.0.1:8000", protocol="completions")
    with pytest.raises(InputError, match="http"):
        fallback_from_url("127.0.0.1:8000")
    with pytest.raises(InputError, match="batch_size"):
        fallback_from_url("http://127.0.0.1:8000", batch_size=0)
    with pytest.raises(InputError, match="timeout_s"):
        fallback_from_url("http://127.0.0.1:8000", timeout_s=0)


def test_cli_fallback_options_build_the_client_and_budget(
    fault: ClassifyFaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from darl_lite.cli import build_parser
    from darl_lite.cli_fallback import fallback_from_args

    base = ["score", "b", "--query", "q", "--items", "-", "--fallback-url", fault.url]
    options = ["--fallback-timeout", "3", "--fallback-call-timeout", "4", "--fallback-retries", "0"]
    options += [
        "--fallback-concurrency",
        "1",
        "--fallback-token-env",
        "S_TEST_TOKEN",
        "--route-budget",
        "0.2",
    ]
    args = build_parser().parse_args([*base, *options])
    monkeypatch.setenv("S_TEST_TOKEN", "sekret")
    client, budget = fallback_from_args(args)
    assert isinstance(client, ClassifyGradeClient) and budget is not None and budget.max_fraction == 0.2
    assert (client.transport.timeout_s, client.call_timeout_s, client.transport.retries) == (3.0, 4.0, 0)
    assert "sekret" not in repr(client)  # the token is sent, never shown
    with client:
        client([(QUERY, ITEMS[0])])
    assert fault.authorization == ["Bearer sekret"]
    monkeypatch.setenv("S_TEST_TOKEN", " ")
    with pytest.raises(InputError, match="S_TEST_TOKEN"):
        fallback_from_args(args)
    no_url = build_parser().parse_args(["score", "b", "--query", "q", "--items", "-"])
    assert fallback_from_args(no_url) == (None, None)


def test_cli_parses_serve_teacher_and_rejects_a_bad_protocol() -> None:
    from darl_lite.cli import build_parser

    args = build_parser().parse_args(["distill", "serve-teacher", "--port", "0", "--max-batch", "8"])
    assert (args.model, args.head, args.host, args.port, args.max_batch) == (None, None, "127.0.0.1", 0, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["score", "b", "--query", "q", "--items", "-", "--fallback-protocol", "grpc"]
        )


# ------------------------------------------------------------------------------------------------
# The real teacher (fetched LLM + shipped head) over HTTP equals the shipped teacher file
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_teacher_over_http_matches_the_shipped_teacher_file() -> None:
    from darl_lite.distill.teacher_fetch import default_cache_dir
    from darl_lite.distill.teacher_server import load_probe_teacher
    from darl_lite.teacher_file import read_teacher_outputs, shipped_teacher_path

    if not (default_cache_dir() / "config.json").exists():
        pytest.fail(
            f"the teacher is not fetched into {default_cache_dir()}: run darl-lite distill fetch-teacher"
        )
    shipped = read_teacher_outputs(shipped_teacher_path())
    rng = np.random.default_rng(0)
    keys = list(shipped)
    pairs = [keys[i] for i in sorted(rng.choice(len(keys), size=8, replace=False))]
    engine = TeacherEngine(load_probe_teacher(), model_name="teacher")
    for url in serve_in_thread(create_app(engine)):
        with ClassifyGradeClient(url, "teacher", batch_size=4, timeout_s=120) as client:
            probs = client(pairs)
    expected = np.stack([shipped[key] for key in pairs])
    assert np.abs(probs - expected).max() <= 1e-3, np.abs(probs - expected).max()
