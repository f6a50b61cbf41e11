"""The typed schema (/openapi.json), the prometheus_client metrics on a per-app registry, the
fallback's state in /healthz and /metrics, and the serve command's options."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from uvicorn_thread import serve_in_thread

from darl_lite import RoutingPolicy, Scorer, SessionConfig

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from darl_lite.serve import create_app  # noqa: E402

DOCS = ["Mapo doufu", "Afghan cuisine", "Jazz"]
ROUTE_ALL = RoutingPolicy(margin_threshold=1.0)  # every pair is a routing candidate


def _scorer(bundle: Path, **options: Any) -> Scorer:
    return Scorer.load(bundle, precision="fp32", session=SessionConfig(intra_op_threads=1), **options)


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path) -> Iterator[str]:
    yield from serve_in_thread(create_app(_scorer(tiny_bundle_dir)))


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    rows = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in rows}


def test_openapi_document_is_valid_and_types_every_endpoint(url: str) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = httpx.get(f"{url}/openapi.json").json()
    validator.validate(doc)  # raises on an invalid document
    paths = doc["paths"]
    assert {"/score", "/v1/rerank", "/v2/rerank", "/rerank", "/healthz", "/metrics"} <= set(paths)
    schemas = doc["components"]["schemas"]
    for path in ("/score", "/v1/rerank", "/v2/rerank", "/rerank"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        refs = [body["$ref"]] if "$ref" in body else [s["$ref"] for s in body["oneOf"]]
        for ref in refs:
            assert ref.split("/")[-1] in schemas
        assert {"401", "413", "422"} <= set(paths[path]["post"]["responses"])
    cohere = schemas["CohereRerankRequest"]
    assert {"query", "documents"} == set(cohere["required"])
    assert {"top_n", "return_documents", "model", "darl_lite"} <= set(cohere["properties"])
    assert schemas["ScoreQuery"]["additionalProperties"] is False  # /score refuses unknown fields
    assert {"texts", "raw_scores", "return_text", "truncate"} <= set(
        schemas["TEIRerankRequest"]["properties"]
    )
    ok = paths["/v2/rerank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/CohereRerankResponse")
    assert httpx.get(f"{url}/docs").status_code == 200


def test_the_response_models_carry_every_pair_score_field(url: str) -> None:
    from dataclasses import fields

    from darl_lite import PairScore
    from darl_lite.serve_schema import DarlLiteDetail, PairScoreOut, ScoreResponse

    names = [f.name for f in fields(PairScore)]
    assert list(PairScoreOut.model_fields) == names
    assert set(names) <= set(DarlLiteDetail.model_fields)  # the opt-in details lose nothing
    body = httpx.post(f"{url}/score", json={"query": "q", "items": DOCS}).json()
    assert [list(r) for r in body["results"]] == [names] * len(DOCS)
    ScoreResponse.model_validate(body)


def test_no_openapi_removes_the_document_and_the_docs(tiny_bundle_dir: Path) -> None:
    for base in serve_in_thread(create_app(_scorer(tiny_bundle_dir), openapi=False)):
        assert httpx.get(f"{base}/openapi.json").status_code == 404
        assert httpx.get(f"{base}/docs").status_code == 404
        assert httpx.post(f"{base}/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


def test_two_apps_in_one_process_keep_their_own_metrics(tiny_bundle_dir: Path, url: str) -> None:
    for other in serve_in_thread(create_app(_scorer(tiny_bundle_dir))):
        before_here, before_other = _metrics(url), _metrics(other)
        assert httpx.post(f"{url}/v2/rerank", json={"query": "q", "documents": DOCS}).status_code == 200
        assert httpx.post(f"{url}/rerank", json={"query": "q", "texts": DOCS[:2]}).status_code == 200
        here, there = _metrics(url), _metrics(other)
        key = "darl_lite_pairs_scored_total"
        assert here[key] - before_here[key] == 5
        assert there[key] == before_other[key]
        assert here['darl_lite_requests_total{endpoint="/v2/rerank",status="200"}'] >= 1
        assert here['darl_lite_request_duration_seconds_count{endpoint="/rerank"}'] >= 1
        for name in (
            "darl_lite_route_rate",
            "darl_lite_pairs_routed_total",
            "darl_lite_fallback_errors_total",
        ):
            assert name in here
        assert not any(k.startswith("darl_lite_fallback_breaker_state") for k in here)  # no fallback


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: connections are refused


def test_a_failing_fallback_opens_its_breaker_in_healthz_and_metrics(tiny_bundle_dir: Path) -> None:
    from darl_lite.llm import CircuitBreaker, fallback_from_url

    client = fallback_from_url(
        f"http://127.0.0.1:{_dead_port()}",
        protocol="classify",
        timeout_s=0.5,
        retries=0,
        breaker=CircuitBreaker(failure_threshold=1, reset_timeout_s=60),
    )
    scorer = _scorer(tiny_bundle_dir, routing=ROUTE_ALL, fallback=client)
    try:
        for base in serve_in_thread(create_app(scorer)):
            health = httpx.get(f"{base}/healthz").json()["fallback"]
            assert health["configured"] and health["breaker"] == "closed" and health["calls"] == 0
            body = {"query": "q", "documents": DOCS, "darl_lite": True}
            details = httpx.post(f"{base}/v2/rerank", json=body).json()["darl_lite"]
            assert all(d["source"] == "student" and d["note"].startswith("fallback failed") for d in details)
            health = httpx.get(f"{base}/healthz").json()["fallback"]
            assert health["breaker"] == "open" and health["failures"] == 1
            assert health["last_latency_ms"] is not None and health["client"]["state"] == "open"
            assert health["client"]["requests"] >= 1 and "endpoint" not in health["client"]  # no URL leaks
            values = _metrics(base)
            assert values['darl_lite_fallback_breaker_state{state="open"}'] == 1.0
            assert values['darl_lite_fallback_breaker_state{state="closed"}'] == 0.0
            assert values['darl_lite_fallback_calls_total{outcome="error"}'] == 1.0
            assert values["darl_lite_fallback_duration_seconds_count"] == 1.0
            assert values["darl_lite_fallback_errors_total"] == len(DOCS)
    finally:
        client.close()


def test_an_answering_fallback_is_timed_and_counted(tiny_bundle_dir: Path) -> None:
    def uniform(pairs: list[tuple[str, str]]) -> np.ndarray:
        return np.full((len(pairs), 3), 1 / 3)

    scorer = _scorer(tiny_bundle_dir, routing=ROUTE_ALL, fallback=uniform)
    for base in serve_in_thread(create_app(scorer)):
        rows = httpx.post(f"{base}/score", json={"query": "q", "items": DOCS}).json()["results"]
        assert [r["source"] for r in rows] == ["llm"] * len(DOCS)
        health = httpx.get(f"{base}/healthz").json()["fallback"]
        assert health["calls"] == 1 and health["failures"] == 0 and health["breaker"] is None
        assert health["p50_latency_ms"] >= 0
        values = _metrics(base)
        assert values["darl_lite_pairs_from_llm_total"] == len(DOCS)
        assert values["darl_lite_pairs_routed_total"] == len(DOCS) and values["darl_lite_route_rate"] == 1.0
        assert values['darl_lite_fallback_calls_total{outcome="ok"}'] == 1.0
    assert scorer.fallback is not None
    np.testing.assert_allclose(np.asarray(scorer.fallback([("q", "a")])), np.full((1, 3), 1 / 3))  # as before


def test_serve_command_takes_the_fallback_and_schema_options() -> None:
    from darl_lite.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "bundle",
            "--no-openapi",
            "--fallback-url",
            "http://127.0.0.1:8000",
            "--fallback-protocol",
            "completions",
            "--fallback-model",
            "grader",
            "--fallback-timeout",
            "1.5",
            "--fallback-call-timeout",
            "4",
            "--fallback-retries",
            "1",
            "--fallback-concurrency",
            "3",
            "--route-budget",
            "0.1",
        ]
    )
    assert args.no_openapi and args.fallback_url == "http://127.0.0.1:8000"
    assert (args.fallback_protocol, args.fallback_model) == ("completions", "grader")
    assert (args.fallback_timeout, args.fallback_call_timeout, args.fallback_retries) == (1.5, 4.0, 1)
    assert (args.fallback_concurrency, args.route_budget) == (3, 0.1)
    defaults = build_parser().parse_args(["serve", "bundle"])
    assert not defaults.no_openapi and defaults.fallback_url is None and defaults.route_budget is None


def test_serve_command_wires_the_fallback_into_healthz(tiny_bundle_dir: Path) -> None:
    """The real command in a subprocess: the fallback options reach the served app."""
    import subprocess
    import sys
    import time

    port, dead = _dead_port(), _dead_port()
    command = [
        sys.executable, "-m", "darl_lite.cli", "serve", str(tiny_bundle_dir), "--port", str(port),
        "--threads", "1", "--no-openapi", "--fallback-url", f"http://127.0.0.1:{dead}",
        "--fallback-timeout", "0.5", "--fallback-retries", "0", "--route-budget", "0.5",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
                assert time.monotonic() < deadline, "darl-lite serve did not start within 60 s"
                time.sleep(0.3)
        fallback = health["fallback"]
        assert fallback["configured"] and fallback["breaker"] == "closed"
        assert fallback["client"]["protocol"] == "classify"
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").status_code == 404  # --no-openapi
    finally:
        server.terminate()
        server.wait(10)
