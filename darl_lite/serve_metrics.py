"""Prometheus metrics of ``darl-lite serve``, through ``prometheus_client``.

Each app gets its own :class:`prometheus_client.CollectorRegistry` (never the process-wide default
one), so several apps in one process, as in the tests, never collide or double-count. Names are the
ones the hand-written exporter used (``darl_lite_requests_total``, ``darl_lite_pairs_scored_total``,
``darl_lite_route_rate``, …); the fallback LLM adds a call-latency histogram, call counts by outcome
and its circuit breaker's state; model passes are counted (``darl_lite_model_passes_total``) with
histograms of the pairs and of the calls each one served (``darl_lite_batch_pairs``,
``darl_lite_batch_requests``), which show how well concurrent requests are coalesced.
``prometheus_client`` comes with the ``serve`` extra and is imported only when :class:`ServeMetrics`
is built.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from darl_lite.errors import MissingExtraError

if TYPE_CHECKING:
    from darl_lite.scorer import PairScore

#: Pairs-per-model-pass histogram bucket upper bounds (the batcher's default cap is 256).
BATCH_PAIR_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Calls-per-model-pass histogram bucket upper bounds.
BATCH_REQUEST_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
#: Latency histogram bucket upper bounds, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Endpoints with their own label value; any other path is counted as ``other`` (bounded labels).
ENDPOINTS: tuple[str, ...] = (
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/healthz",
    "/metrics",
    "/openapi.json",
)
BREAKER_STATES: tuple[str, ...] = ("closed", "open", "half_open")
#: Fields of a client's ``health()`` that /healthz passes on (no URL, model or error text).
CLIENT_HEALTH_KEYS = frozenset(
    {"protocol", "state", "consecutive_failures", "calls", "failed_calls", "requests", "failures",
     "last_latency_ms", "p50_latency_ms", "error"}
)  # fmt: skip
#: Recent fallback calls kept for the median latency that /healthz reports.
LATENCY_WINDOW = 256


class TimedFallback:
    """Wraps a fallback: times every call and counts failures; everything else is delegated.

    The scorer calls it exactly as it called the wrapped fallback; attributes (``breaker``,
    ``health()``, ``close()``) reach the wrapped object, so code that inspects the client still works.
    """

    def __init__(self, inner: Callable[[list[tuple[str, str]]], Any], observe: Callable[[float, bool], None]):
        self.inner = inner
        self._observe = observe
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.calls = 0
        self.failures = 0

    def __call__(self, pairs: list[tuple[str, str]]) -> Any:
        started = time.perf_counter()
        ok = False
        try:
            answer = self.inner(pairs)
            ok = True
            return answer
        finally:
            seconds = time.perf_counter() - started
            with self._lock:
                self.calls += 1
                self.failures += not ok
                self._recent.append(seconds)
            self._observe(seconds, ok)

    def __getattr__(self, name: str) -> Any:  # only called for names this wrapper lacks
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def health(self) -> dict[str, Any]:
        """Breaker state, calls, failures and last / median latency (ms) of recent calls."""
        with self._lock:
            recent = sorted(self._recent)
            last = self._recent[-1] if self._recent else None
            calls, failures = self.calls, self.failures
        state = breaker_state(self.inner)
        out: dict[str, Any] = {
            "configured": True,
            "breaker": state,
            "calls": calls,
            "failures": failures,
            "last_latency_ms": None if last is None else round(last * 1000, 3),
            "p50_latency_ms": None if not recent else round(recent[len(recent) // 2] * 1000, 3),
        }
        client_health = getattr(self.inner, "health", None)
        if callable(client_health):
            try:
                report = dict(client_health())
            except Exception as exc:  # a health probe must never fail /healthz
                report = {"error": type(exc).__name__}
            # /healthz is unauthenticated: counts and states only, never the URL or error texts.
            out["client"] = {k: v for k, v in report.items() if k in CLIENT_HEALTH_KEYS}
        return out


def breaker_state(fallback: object) -> str | None:
    """The circuit breaker state of a fallback client (``closed``/``open``/``half_open``), if it has one."""
    health = getattr(fallback, "health", None)
    if callable(health):
        try:
            report = dict(health())
        except Exception:  # a health probe must never fail a scrape
            report = {}
        state = report.get("state", report.get("breaker"))  # darl_lite.llm clients say "state"
        if isinstance(state, str):
            return state
    breaker = getattr(fallback, "breaker", None)
    state = getattr(breaker, "state", None)
    return state if isinstance(state, str) else None


class ServeMetrics:
    """The app's metrics on a private registry; ``render()`` gives the Prometheus text format."""

    def __init__(self, fallback: Callable[[], TimedFallback | None] = lambda: None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise MissingExtraError.for_module("prometheus_client", "serve") from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self._fallback = fallback
        self._lock = threading.Lock()
        self._pairs = 0
        self._routed = 0
        reg = self.registry
        self.requests = prom.Counter(
            "darl_lite_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
            registry=reg,
        )  # fmt: skip
        self.latency = prom.Histogram(
            "darl_lite_request_duration_seconds", "Request latency.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.pairs = prom.Counter("darl_lite_pairs_scored", "Pairs scored.", registry=reg)
        self.routed = prom.Counter(
            "darl_lite_pairs_routed", "Pairs routed to the LLM (within budget).", registry=reg
        )
        self.from_llm = prom.Counter("darl_lite_pairs_from_llm", "Pairs answered by the LLM.", registry=reg)
        self.fallback_errors = prom.Counter(
            "darl_lite_fallback_errors", "Routed pairs the LLM failed.", registry=reg
        )
        self.budget_refused = prom.Counter(
            "darl_lite_pairs_budget_refused",
            "Pairs routing wanted but a per-call or sliding-window budget refused.",
            registry=reg,
        )
        rate = prom.Gauge("darl_lite_route_rate", "Share of scored pairs routed, since start.", registry=reg)
        rate.set_function(self._route_rate)
        self.fallback_latency = prom.Histogram(
            "darl_lite_fallback_duration_seconds", "Latency of one call to the fallback LLM.",
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.fallback_calls = prom.Counter(
            "darl_lite_fallback_calls", "Calls to the fallback LLM by outcome.", ["outcome"], registry=reg
        )
        self.model_passes = prom.Counter(
            "darl_lite_model_passes", "onnxruntime model passes (one may serve many requests).", registry=reg
        )
        self.batch_pairs = prom.Histogram(
            "darl_lite_batch_pairs", "Pairs per model pass.", buckets=BATCH_PAIR_BUCKETS, registry=reg
        )
        self.batch_requests = prom.Histogram(
            "darl_lite_batch_requests", "Scoring calls served by one model pass.",
            buckets=BATCH_REQUEST_BUCKETS, registry=reg,
        )  # fmt: skip
        reg.register(_BreakerCollector(prom, fallback))
        for endpoint in ENDPOINTS:  # every histogram series exists from the start, as before
            self.latency.labels(endpoint)

    def _route_rate(self) -> float:
        with self._lock:
            return self._routed / self._pairs if self._pairs else 0.0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if endpoint != "other":
            self.latency.labels(endpoint).observe(seconds)

    def observe_results(self, results: Sequence[PairScore]) -> None:
        routed = sum(r.routed for r in results)
        with self._lock:
            self._pairs += len(results)
            self._routed += routed
        self.pairs.inc(len(results))
        self.routed.inc(routed)
        self.from_llm.inc(sum(r.source == "llm" for r in results))
        self.fallback_errors.inc(sum(r.note.startswith("fallback failed") for r in results))
        self.budget_refused.inc(sum("budget exhausted" in r.note for r in results))

    def observe_pass(self, pairs: int, requests: int) -> None:
        """One model pass over ``pairs`` pairs serving ``requests`` scoring calls."""
        self.model_passes.inc()
        self.batch_pairs.observe(pairs)
        self.batch_requests.observe(requests)

    def observe_fallback(self, seconds: float, ok: bool) -> None:
        self.fallback_latency.observe(seconds)
        self.fallback_calls.labels("ok" if ok else "error").inc()

    def render(self) -> bytes:
        return bytes(self._prom.generate_latest(self.registry))

    @property
    def content_type(self) -> str:
        return str(self._prom.CONTENT_TYPE_LATEST)


class _BreakerCollector:
    """``darl_lite_fallback_breaker_state{state=...}``: 1 for the fallback's current state, read at
    scrape time; nothing when no fallback (or one without a breaker) is configured."""

    def __init__(self, prom: Any, fallback: Callable[[], TimedFallback | None]) -> None:
        self._family = prom.metrics_core.GaugeMetricFamily
        self._fallback = fallback

    def describe(self) -> list[Any]:
        return []  # described at collect time: whether the series exist depends on the fallback

    def collect(self) -> Iterator[Any]:
        fallback = self._fallback()
        state = breaker_state(fallback.inner) if fallback is not None else None
        if state is None:
            return
        family = self._family(
            "darl_lite_fallback_breaker_state",
            "Circuit breaker of the fallback LLM: 1 for the current state.",
            labels=["state"],
        )
        for name in BREAKER_STATES:
            family.add_metric([name], 1.0 if state == name else 0.0)
        yield family


__all__ = [
    "BATCH_PAIR_BUCKETS",
    "BATCH_REQUEST_BUCKETS",
    "BREAKER_STATES",
    "ENDPOINTS",
    "LATENCY_BUCKETS",
    "ServeMetrics",
    "TimedFallback",
    "breaker_state",
]
