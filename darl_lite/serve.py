"""``darl-lite serve``: an HTTP JSON API for search nodes that are not Python.

Endpoints:

* ``POST /score`` — ``{"query", "items"}`` or ``{"requests": [{"query", "items"}, ...]}``; unknown
  fields are refused.
* ``POST /v1/rerank``, ``/v2/rerank``, ``/rerank`` — Cohere/Jina-style reranking; ``/rerank`` with
  ``texts`` speaks text-embeddings-inference instead (:mod:`darl_lite.serve_rerank`).
* ``GET /healthz`` (readiness and the fallback's state), ``GET /metrics`` (Prometheus, through
  ``prometheus_client``: :mod:`darl_lite.serve_metrics`), ``GET /openapi.json`` and ``/docs``
  (the typed schema, :mod:`darl_lite.serve_schema`; ``openapi=False`` / ``--no-openapi`` removes them).

Concurrent requests on every scoring route are coalesced (:mod:`darl_lite.serve_batching`): a
model pass scores the pairs of everything queued, up to ``max_batch_pairs`` (``--max-batch-pairs``),
on one of ``model_workers`` sessions (``--model-workers``, default 2), while routing and the
fallback stay per request; ``batching=False`` (``--no-batching``) scores each request on its own.

Safe defaults: bound to 127.0.0.1, request bodies capped while they stream in and item counts capped
before any scoring, an optional bearer token compared in constant time and never logged or echoed,
bad input answered 422 with a message naming the field, anything else 500 without a stack trace;
every error is ``{"detail": "..."}``. FastAPI, pydantic, prometheus_client and uvicorn come from the
``serve`` extra and are imported only when an app is built, so importing this module costs nothing.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime,
# and ``Request`` is imported inside :func:`create_app`, where only eager evaluation can see it.
import contextlib
import dataclasses
import hmac
import json
import logging
import operator
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.http_body import HTTPProblem
from darl_lite.http_body import read_body as read_capped_body
from darl_lite.scorer import PairScore, Scorer, flatten_query, flatten_requests
from darl_lite.serve_batching import (
    DEFAULT_GATHER_WAIT_MS,
    DEFAULT_MAX_BATCH_PAIRS,
    DEFAULT_MODEL_WORKERS,
    RequestBatcher,
    check_batching_options,
)
from darl_lite.serve_metrics import ENDPOINTS, LATENCY_BUCKETS, TimedFallback

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_items: int = 1000
    max_body_bytes: int = 1_000_000
    openapi: bool = True  # serve /openapi.json and /docs
    batching: bool = True  # coalesce concurrent requests into shared model passes (serve_batching)
    max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS  # pairs of one coalesced pass at most
    model_workers: int = DEFAULT_MODEL_WORKERS  # coalesced passes at once, each its own session
    gather_wait_ms: float = DEFAULT_GATHER_WAIT_MS  # a free worker's wait for company (serve_batching)

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_body_bytes < 1:
            raise InputError("max_items and max_body_bytes must be >= 1")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must lie in [0, 65535], got {self.port}")
        check_batching(self.batching, self.max_batch_pairs, self.model_workers, self.gather_wait_ms)


def check_batching(
    batching: object,
    max_batch_pairs: object,
    model_workers: object = DEFAULT_MODEL_WORKERS,
    gather_wait_ms: object = DEFAULT_GATHER_WAIT_MS,
) -> None:
    """:class:`InputError` naming the option when ``batching``, ``max_batch_pairs``,
    ``model_workers`` or ``gather_wait_ms`` is unusable."""
    if not isinstance(batching, bool):
        raise InputError(f"batching must be true or false, got {batching!r}")
    check_batching_options(max_batch_pairs, model_workers=model_workers, gather_wait_ms=gather_wait_ms)


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError as exc:
        raise MissingExtraError.for_module("fastapi", "serve") from exc
    return fastapi


def decode_json(raw: bytes) -> object:
    """The JSON value of a request body, or :class:`InputError` saying why it is not JSON."""
    try:
        return json.loads(raw)
    except RecursionError as exc:  # json's decoder recurses once per nesting level
        raise InputError("request body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise InputError(f"request body is not valid JSON: {exc}") from exc


def check_item_count(total: int, max_items: int) -> None:
    if total > max_items:
        raise InputError(f"{total} items in one request exceeds the limit of {max_items} (--max-items)")


def parse_score_body(body: object, max_items: int) -> tuple[bool, list[tuple[str, list[str]]]]:
    """``(batch, [(query, items), ...])`` from a decoded ``/score`` body, or :class:`InputError`.

    Checked by hand rather than by the pydantic models, which only document it: these messages
    (``items must be a list of strings, got a single str``) are the API's contract.
    """
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
    check_item_count(sum(len(items) if isinstance(items, list) else 0 for _, items in pairs), max_items)
    return batch, pairs


async def read_body(request: Any, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_body_bytes`` (declared or streamed)."""
    return await read_capped_body(request, max_body_bytes, " (--max-body-bytes)")


def create_app(
    scorer: Scorer,
    *,
    max_items: int = 1000,
    max_body_bytes: int = 1_000_000,
    token: str | None = None,
    openapi: bool = True,
    batching: bool = True,
    max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
    batch_wait_ms: float = 0.0,
    model_workers: int = DEFAULT_MODEL_WORKERS,
    gather_wait_ms: float = DEFAULT_GATHER_WAIT_MS,
) -> Any:
    """The FastAPI app serving ``scorer``.

    ``token`` (if given) is required as ``Bearer`` on every POST route and on /metrics; /healthz
    stays open for load balancers (readiness and the fallback's breaker state and counts, nothing
    else), as does the schema. A configured ``scorer.fallback`` is wrapped in
    :class:`~darl_lite.serve_metrics.TimedFallback` so its latency reaches /metrics and /healthz.

    ``batching`` (default) sends every scoring route through a
    :class:`~darl_lite.serve_batching.RequestBatcher`: concurrent requests share model passes of at
    most ``max_batch_pairs`` pairs, one onnxruntime run at a time (``batch_wait_ms`` > 0 also lingers
    that long after a first request for company; default 0: whatever queued during the previous
    pass; while another pass runs, a free worker waits up to ``gather_wait_ms`` for company);
    False scores each request on its own in the scorer's executor.
    """
    fastapi = _import_fastapi()
    from darl_lite import serve_schema as schema
    from darl_lite.serve_metrics import ServeMetrics

    if max_items < 1 or max_body_bytes < 1:
        raise InputError("max_items and max_body_bytes must be >= 1")
    if token is not None and not token.strip():
        raise InputError("token must be a non-empty string, or None for no authentication")
    check_batching(batching, max_batch_pairs, model_workers, gather_wait_ms)

    def timed_fallback() -> TimedFallback | None:
        return scorer.fallback if isinstance(scorer.fallback, TimedFallback) else None

    metrics = ServeMetrics(timed_fallback)
    if scorer.fallback is not None and not isinstance(scorer.fallback, TimedFallback):
        scorer.fallback = TimedFallback(scorer.fallback, metrics.observe_fallback)
    batcher = (
        RequestBatcher(
            scorer,
            max_batch_pairs=max_batch_pairs,
            max_wait_ms=batch_wait_ms,
            observe=metrics.observe_pass,
            model_workers=model_workers,
            gather_wait_ms=gather_wait_ms,
        )
        if batching
        else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield  # the batcher starts on the first request, in the serving loop
        if batcher is not None:
            await batcher.close()

    app = fastapi.FastAPI(
        lifespan=lifespan,
        title="darl-lite",
        summary="Graded query–item relevance: score, rerank (Cohere/Jina, text-embeddings-inference).",
        docs_url="/docs" if openapi else None,
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
    )
    app.state.metrics = metrics
    app.state.batcher = batcher
    expected = f"Bearer {token}".encode() if token is not None else None
    ctx = _Context(scorer, metrics, schema, expected, max_items, max_body_bytes, batcher)
    _install_middleware(app, metrics)
    _install_info_routes(app, ctx)
    _install_score_route(app, ctx)
    _install_rerank_routes(app, ctx)
    if openapi:
        schema.install_openapi(app)
    return app


@dataclass(frozen=True)
class _Context:
    """What every route needs: the scorer, the metrics, the schema module, auth and limits."""

    scorer: Scorer
    metrics: Any
    schema: Any
    expected_auth: bytes | None
    max_items: int
    max_body_bytes: int
    batcher: RequestBatcher | None  # None: --no-batching

    async def score_many(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[list[PairScore]]:
        """``scorer.score_many(pairs)`` through the batcher (or alone with batching off)."""
        if self.batcher is not None:
            return await self.batcher.submit_flat(flatten_requests(pairs))
        results = await self.scorer.ascore_many(pairs)
        self._observe_unbatched(sum(len(group) for group in results))
        return results

    async def score(self, query: str, items: Sequence[str]) -> list[PairScore]:
        """``scorer.score(query, items)`` through the batcher (or alone with batching off)."""
        if self.batcher is not None:
            return (await self.batcher.submit_flat(flatten_query(query, items)))[0]
        results = await self.scorer.ascore(query, items)
        self._observe_unbatched(len(results))
        return results

    def _observe_unbatched(self, pairs: int) -> None:
        if pairs:  # one request, one model pass (the batcher counts its own)
            self.metrics.observe_pass(pairs, 1)

    @property
    def errors(self) -> dict[int | str, dict[str, Any]]:
        """The documented error responses of a POST route."""
        return {
            code: {"model": self.schema.ErrorResponse, "description": text}
            for code, text in (
                (401, "missing or wrong bearer token"),
                (413, "request body over --max-body-bytes"),
                (422, "bad input; the message names the field"),
            )
        }

    def authorise(self, request: Any) -> None:
        given = request.headers.get("authorization", "").encode()
        if self.expected_auth is not None and not hmac.compare_digest(given, self.expected_auth):
            raise HTTPProblem(401, "missing or wrong bearer token")

    async def guarded(self, request: Any, work: Callable[[object], Any]) -> Any:
        """Auth, size cap, JSON, then ``await work(body)``; every refusal becomes ``{"detail"}``."""
        from fastapi.responses import JSONResponse
        from pydantic import ValidationError

        try:
            self.authorise(request)
            body = decode_json(await read_body(request, self.max_body_bytes))
            return await work(body)
        except HTTPProblem as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except InputError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        except ValidationError as exc:
            return JSONResponse({"detail": self.schema.describe_validation_error(exc)}, status_code=422)

    async def cohere(self, body: object, version: str) -> Any:
        from fastapi.responses import JSONResponse

        from darl_lite.serve_rerank import cohere_response

        request = self.schema.CohereRerankRequest.model_validate(body)
        check_item_count(len(request.documents), self.max_items)
        results = await self.score(request.query, request.documents)
        self.metrics.observe_results(results)
        bundle = self.scorer.bundle
        answer = cohere_response(
            request, results, gains=bundle.grade_gains, grade_names=bundle.grade_names, api_version=version
        )
        return JSONResponse(answer.model_dump(mode="json", exclude_none=True))

    async def vllm(self, body: object) -> Any:
        """vLLM's score API: the pairs of ``text_1`` x ``text_2``, scores in input order."""
        from fastapi.responses import JSONResponse

        from darl_lite.serve_rerank import vllm_pairs, vllm_score_response

        request = self.schema.VLLMScoreRequest.model_validate(body)
        pairs = vllm_pairs(request)
        check_item_count(sum(len(items) for _, items in pairs), self.max_items)
        results = [r for group in await self.score_many(pairs) for r in group]
        self.metrics.observe_results(results)
        model = request.model or self.scorer.bundle.directory.name
        answer = vllm_score_response(results, gains=self.scorer.bundle.grade_gains, model=model)
        return JSONResponse(answer.model_dump(mode="json"))

    async def tei(self, body: object) -> Any:
        from fastapi.responses import JSONResponse

        from darl_lite.serve_rerank import tei_response

        request = self.schema.TEIRerankRequest.model_validate(body)
        check_item_count(len(request.texts), self.max_items)
        results = await self.score(request.query, request.texts)
        self.metrics.observe_results(results)
        ranks = tei_response(request, results, gains=self.scorer.bundle.grade_gains)
        return JSONResponse([r.model_dump(mode="json", exclude_none=True) for r in ranks])


_PAIR_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PairScore))
_pair_values = operator.attrgetter(*_PAIR_FIELDS)


def pair_score_dict(score: PairScore) -> dict[str, Any]:
    """``dataclasses.asdict(score)`` without its deep copies (same keys, same JSON), for /score."""
    return dict(zip(_PAIR_FIELDS, _pair_values(score), strict=True))


class _ObserveMiddleware:
    """Request counts and latency for /metrics, and a bare 500 for anything unhandled.

    A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    runs every request through extra tasks and memory streams, a fixed cost per request that a
    10-item request feels.
    """

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = False

        async def observed_send(message: Any) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status, sent = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # anything unhandled: logged here, a bare 500 to the client
            logger.exception("unhandled error serving %s", scope.get("path"))
            if not sent:
                from fastapi.responses import JSONResponse

                status = 500
                await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status, time.perf_counter() - started)


def _install_middleware(app: Any, metrics: Any) -> None:
    app.add_middleware(_ObserveMiddleware, metrics=metrics)


def _install_info_routes(app: Any, ctx: _Context) -> None:
    """``GET /healthz`` (open) and ``GET /metrics`` (token)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    scorer = ctx.scorer

    @app.get("/healthz", response_model=ctx.schema.HealthResponse)
    async def healthz() -> Any:
        fallback, batcher = scorer.fallback, ctx.batcher
        return {
            "status": "ok",
            "bundle_loaded": True,
            "precision": scorer.precision,
            "format_version": scorer.bundle.manifest.get("format_version"),
            "grades": scorer.grade_names,
            "fallback": fallback.health() if isinstance(fallback, TimedFallback) else {"configured": False},
            "batching": {
                "enabled": batcher is not None,
                "max_batch_pairs": batcher.max_batch_pairs if batcher is not None else None,
                "model_workers": batcher.model_workers if batcher is not None else None,
            },
        }

    @app.get("/metrics", response_class=Response, responses={401: ctx.errors[401]})
    async def metrics_text(request: Request) -> Any:
        try:
            ctx.authorise(request)
        except HTTPProblem as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


def _install_score_route(app: Any, ctx: _Context) -> None:
    """``POST /score``: darl-lite's own API, every field of every pair; vLLM's score API there (by
    its ``text_1`` / ``text_2`` body) and at ``/v1/score``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def work(body: object) -> Any:
        if isinstance(body, dict) and ("text_1" in body or "text_2" in body):
            return await ctx.vllm(body)  # vLLM's score API on its own path
        batch, pairs = parse_score_body(body, ctx.max_items)
        results = await ctx.score_many(pairs)
        for group in results:
            ctx.metrics.observe_results(group)
        rows = [[pair_score_dict(r) for r in group] for group in results]
        return JSONResponse({"results": rows if batch else rows[0]})

    @app.post(
        "/score",
        response_model=ctx.schema.ScoreResponse | ctx.schema.VLLMScoreResponse,
        responses=ctx.errors,
        summary='Score: darl-lite\'s own ("query", "items"), or vLLM\'s score API ("text_1", "text_2")',
    )
    async def score(request: Request) -> Any:
        return await ctx.guarded(request, work)

    @app.post(
        "/v1/score",
        response_model=ctx.schema.VLLMScoreResponse,
        responses=ctx.errors,
        summary="Score (vLLM's score API)",
    )
    async def score_v1(request: Request) -> Any:
        return await ctx.guarded(request, ctx.vllm)


def _install_rerank_routes(app: Any, ctx: _Context) -> None:
    """``POST /v1/rerank``, ``/v2/rerank`` (Cohere/Jina) and ``/rerank`` (also TEI, by its body)."""
    from fastapi import Request

    from darl_lite.serve_schema import CohereRerankResponse, TEIRank

    schema = ctx.schema

    def versioned(version: str) -> Callable[[Any], Any]:
        async def rerank_versioned(request: Request) -> Any:
            return await ctx.guarded(request, lambda body: ctx.cohere(body, version))

        return rerank_versioned

    for version in ("1", "2"):
        app.post(
            f"/v{version}/rerank",
            response_model=schema.CohereRerankResponse,
            responses=ctx.errors,
            name=f"rerank_v{version}",
            summary=f"Rerank documents (Cohere v{version} / Jina style)",
        )(versioned(version))

    async def either(body: object) -> Any:
        from darl_lite.serve_rerank import rerank_form

        return await (ctx.tei(body) if rerank_form(body) == "tei" else ctx.cohere(body, "2"))

    @app.post(
        "/rerank",
        response_model=CohereRerankResponse | list[TEIRank],
        responses=ctx.errors,
        summary='Rerank: Cohere/Jina with "documents", text-embeddings-inference with "texts"',
    )
    async def rerank(request: Request) -> Any:
        return await ctx.guarded(request, either)


def serve(scorer: Scorer, config: ServeConfig | None = None, *, token: str | None = None) -> None:
    """Run the API with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError.for_module("uvicorn", "serve") from exc
    cfg = config or ServeConfig()
    app = create_app(
        scorer,
        max_items=cfg.max_items,
        max_body_bytes=cfg.max_body_bytes,
        token=token,
        openapi=cfg.openapi,
        batching=cfg.batching,
        max_batch_pairs=cfg.max_batch_pairs,
        model_workers=cfg.model_workers,
        gather_wait_ms=cfg.gather_wait_ms,
    )
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        logger.warning("serving on %s without a bearer token: anyone who can reach it can score", cfg.host)
    logger.info("serving %s on http://%s:%d", scorer.bundle.directory, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


__all__ = [
    "ENDPOINTS",
    "LATENCY_BUCKETS",
    "HTTPProblem",
    "ServeConfig",
    "check_batching",
    "check_item_count",
    "create_app",
    "decode_json",
    "pair_score_dict",
    "parse_score_body",
    "read_body",
    "serve",
]
