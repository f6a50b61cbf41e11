"""``darl-lite serve``: an HTTP JSON API for search nodes that are not Python.

Endpoints: ``POST /score`` (``{"query", "items"}`` or ``{"requests": [{"query", "items"}, ...]}``),
``GET /healthz`` and ``GET /metrics`` (Prometheus text). Safe defaults: bound to 127.0.0.1, request
bodies and item counts capped before any scoring, an optional bearer token compared in constant time
and never logged or echoed, bad input answered 422 with the :class:`InputError` message, anything
else 500 without a stack trace. FastAPI and uvicorn come from the ``serve`` extra and are imported
only when an app is built, so importing this module costs nothing.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime,
# and ``Request`` is imported inside :func:`create_app`, where only eager evaluation can see it.
import hmac
import json
import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.scorer import PairScore, Scorer

logger = logging.getLogger(__name__)

#: Latency histogram bucket upper bounds, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENDPOINTS: tuple[str, ...] = ("/score", "/healthz", "/metrics")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_items: int = 1000
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_body_bytes < 1:
            raise InputError("max_items and max_body_bytes must be >= 1")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must lie in [0, 65535], got {self.port}")


class Metrics:
    """Counters and a latency histogram in Prometheus text format; thread-safe, no dependency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency_counts: dict[str, list[int]] = {e: [0] * (len(LATENCY_BUCKETS) + 1) for e in ENDPOINTS}
        self.latency_sum: dict[str, float] = dict.fromkeys(ENDPOINTS, 0.0)
        self.pairs = 0
        self.routed = 0
        self.from_llm = 0
        self.fallback_errors = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if endpoint in self.latency_counts:
                self.latency_counts[endpoint][bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self.latency_sum[endpoint] += seconds

    def observe_results(self, results: list[PairScore]) -> None:
        with self._lock:
            self.pairs += len(results)
            self.routed += sum(r.routed for r in results)
            self.from_llm += sum(r.source == "llm" for r in results)
            self.fallback_errors += sum(r.note.startswith("fallback failed") for r in results)

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP darl_lite_requests_total HTTP requests by endpoint and status.",
                "# TYPE darl_lite_requests_total counter",
                *(
                    f'darl_lite_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())
                ),
                "# HELP darl_lite_request_duration_seconds Request latency.",
                "# TYPE darl_lite_request_duration_seconds histogram",
            ]
            hist = "darl_lite_request_duration_seconds"
            for endpoint, counts in self.latency_counts.items():
                label = f'endpoint="{endpoint}"'
                total = 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    total += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'{hist}_bucket{{{label},le="{le}"}} {total}')
                lines.append(f"{hist}_sum{{{label}}} {self.latency_sum[endpoint]}")
                lines.append(f"{hist}_count{{{label}}} {total}")
            rate = self.routed / self.pairs if self.pairs else 0.0
            for name, kind, value, text in (
                ("pairs_scored_total", "counter", self.pairs, "Pairs scored."),
                ("pairs_routed_total", "counter", self.routed, "Pairs routed to the LLM (within budget)."),
                ("pairs_from_llm_total", "counter", self.from_llm, "Pairs answered by the LLM."),
                ("fallback_errors_total", "counter", self.fallback_errors, "Routed pairs the LLM failed."),
                ("route_rate", "gauge", rate, "Share of scored pairs routed, since start."),
            ):
                lines += [f"# HELP darl_lite_{name} {text}", f"# TYPE darl_lite_{name} {kind}"]
                lines.append(f"darl_lite_{name} {value}")
        return "\n".join(lines) + "\n"


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError as exc:
        raise MissingExtraError.for_module("fastapi", "serve") from exc
    return fastapi


def _parse_body(raw: bytes, max_items: int) -> tuple[bool, list[tuple[str, list[str]]]]:
    """``(batch, [(query, items), ...])`` from a request body, or :class:`InputError`."""
    try:
        body = json.loads(raw)
    except RecursionError as exc:  # json's decoder recurses once per nesting level
        raise InputError("request body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise InputError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InputError('request body must be a JSON object: {"query", "items"} or {"requests": [...]}')
    batch = "requests" in body
    allowed = {"requests"} if batch else {"query", "items"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(f"unknown fields {unknown}; expected {sorted(allowed)}")
    if batch:
        requests = body["requests"]
        if not isinstance(requests, list):
            raise InputError(f"requests must be a list of objects, got {type(requests).__name__}")
        for i, request in enumerate(requests):
            if not isinstance(request, dict) or set(request) != {"query", "items"}:
                raise InputError(f'requests[{i}] must be an object with exactly "query" and "items"')
        pairs = [(r["query"], r["items"]) for r in requests]
    else:
        missing = sorted({"query", "items"} - set(body))
        if missing:
            raise InputError(f"missing fields {missing}")
        pairs = [(body["query"], body["items"])]
    total = sum(len(items) if isinstance(items, list) else 0 for _, items in pairs)
    if total > max_items:
        raise InputError(f"{total} items in one request exceeds the limit of {max_items} (--max-items)")
    return batch, pairs


def create_app(
    scorer: Scorer,
    *,
    max_items: int = 1000,
    max_body_bytes: int = 1_000_000,
    token: str | None = None,
) -> Any:
    """The FastAPI app serving ``scorer``; ``token`` (if given) is required as ``Bearer`` on /score
    and /metrics (/healthz stays open for load balancers and reveals nothing but readiness)."""
    fastapi = _import_fastapi()
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    if max_items < 1 or max_body_bytes < 1:
        raise InputError("max_items and max_body_bytes must be >= 1")
    if token is not None and not token.strip():
        raise InputError("token must be a non-empty string, or None for no authentication")
    expected = f"Bearer {token}".encode() if token is not None else None
    metrics = Metrics()
    app = fastapi.FastAPI(title="darl-lite", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    def error(status: int, message: str) -> Any:
        return JSONResponse({"detail": message}, status_code=status)

    def authorised(request: Any) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    @app.middleware("http")
    async def observe(request: Any, call_next: Any) -> Any:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        except Exception:  # anything unhandled: logged here, a bare 500 to the client
            logger.exception("unhandled error serving %s", request.url.path)
            return error(500, "internal error")
        finally:
            metrics.observe_request(request.url.path, status, time.perf_counter() - started)

    @app.get("/healthz")
    async def healthz() -> Any:
        manifest = scorer.bundle.manifest
        return {
            "status": "ok",
            "bundle_loaded": True,
            "precision": scorer.precision,
            "format_version": manifest.get("format_version"),
            "grades": scorer.grade_names,
        }

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/score")
    async def score(request: Request) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        declared = request.headers.get("content-length")
        too_big = f"request body exceeds the limit of {max_body_bytes} bytes (--max-body-bytes)"
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return error(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                return error(413, too_big)
            chunks.append(chunk)
        try:
            batch, pairs = _parse_body(b"".join(chunks), max_items)
            results = await scorer.ascore_many(pairs)
        except InputError as exc:
            return error(422, str(exc))
        for group in results:
            metrics.observe_results(group)
        rows = [[asdict(r) for r in group] for group in results]
        return {"results": rows if batch else rows[0]}

    return app


def serve(scorer: Scorer, config: ServeConfig | None = None, *, token: str | None = None) -> None:
    """Run the API with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError.for_module("uvicorn", "serve") from exc
    cfg = config or ServeConfig()
    app = create_app(scorer, max_items=cfg.max_items, max_body_bytes=cfg.max_body_bytes, token=token)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        logger.warning("serving on %s without a bearer token: anyone who can reach it can score", cfg.host)
    logger.info("serving %s on http://%s:%d", scorer.bundle.directory, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


__all__ = ["LATENCY_BUCKETS", "Metrics", "ServeConfig", "create_app", "serve"]
