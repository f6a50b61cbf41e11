"""The HTTP machinery every LLM fallback client shares: one place for the robustness rules.

A client turns a call's pairs into request bodies (one per pair for completions, one per batch of
pairs for classification) and a parser; :class:`HTTPTransport` sends them and enforces, in the order
a request meets them:

* **Circuit breaker** (:class:`~darl_lite.llm.breaker.CircuitBreaker`): while open, calls fail fast
  with :class:`CircuitOpenError` and send nothing; half-open, the call's first request is the probe
  and the rest wait for its outcome. It counts requests after their retries: one whose retries ran
  out, that got a 4xx, or whose answer was unusable is one failure; any answered request resets it.
* **Concurrency limit**: one bounded thread pool (``max_concurrency``) per transport, shared by
  every thread that calls it, so the server never sees more than that many requests from a client.
* **Connection reuse**: one ``httpx.Client`` (thread-safe, keep-alive), created on first use.
* **Per-request timeout** ``timeout_s`` and a **call deadline** ``call_timeout_s`` that bounds how
  long the caller waits, however many requests are queued.
* **Retries** with exponential backoff and jitter on connection errors, timeouts, 5xx, 408 and 429;
  never on other 4xx (a bad model name or an over-long prompt does not heal) nor on an unusable answer.

**One failed request fails the whole call** (:class:`FallbackError`): the scorer wants one array for
all routed pairs, so raising at the first failure stops the call's other requests and returns
within the deadline with a precise reason. :meth:`HTTPTransport.health` reports the breaker state,
counts and latencies that a node's ``/healthz`` and ``/metrics`` show.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.errors import CircuitOpenError, FallbackError
from darl_lite.llm.validate import check_int

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth another attempt besides 5xx: request timeout, rate limiting.
_RETRY_STATUS = frozenset({408, 429})
#: How many answered calls the latency median is taken over.
LATENCY_WINDOW = 256


def import_httpx() -> ModuleType:
    """``httpx`` or :class:`MissingExtraError` naming the ``llm`` extra."""
    try:
        import httpx
    except ImportError as exc:
        raise MissingExtraError.for_module("httpx", "llm") from exc
    return httpx


class _Abandoned(Exception):
    """Internal: the call this request belonged to has already failed or the client is closing."""


class _CallState:
    """What the requests of one call share: its deadline and a flag raised when it is abandoned."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.abandoned = threading.Event()


class _Stats:
    """Counters and call latencies for :meth:`HTTPTransport.health`; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = self.failed_calls = self.requests = self.failures = 0
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_error = ""

    def request(self, failed: bool, error: str = "") -> None:
        with self.lock:
            self.requests += 1
            if failed:
                self.failures += 1
                self.last_error = error

    def call(self, seconds: float | None, error: str = "") -> None:
        """One call ended: answered after ``seconds``, or failed (``seconds`` None) with ``error``."""
        with self.lock:
            self.calls += 1
            if seconds is None:
                self.failed_calls += 1
                self.last_error = error
            else:
                self.latencies_ms.append(seconds * 1000.0)


class HTTPTransport:
    """Sends a call's request bodies to one endpoint under the rules in this module's docstring.

    ``unit`` names what one request carries (``"pair"``, ``"batch"``) in error messages. The
    ``api_key`` is sent as a bearer token and never logged or shown. Thread-safe; :meth:`close`
    releases connections and worker threads, a later call opens them again.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 2.0,
        call_timeout_s: float | None = None,
        max_concurrency: int = 8,
        retries: int = 2,
        backoff_s: float = 0.05,
        api_key: str | None = None,
        breaker: CircuitBreaker | None = None,
        unit: str = "pair",
    ) -> None:
        self._httpx = import_httpx()
        check_int(max_concurrency, "max_concurrency", 1)
        check_int(retries, "retries", 0)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise InputError(f"timeout_s must be > 0 seconds; got {timeout_s!r}")
        if isinstance(backoff_s, bool) or not isinstance(backoff_s, (int, float)) or not backoff_s >= 0:
            raise InputError(f"backoff_s must be >= 0 seconds; got {backoff_s!r}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff_s = float(backoff_s)
        worst = (retries + 1) * self.timeout_s + sum(self.backoff_s * 2**a for a in range(retries))
        self.call_timeout_s = float(call_timeout_s) if call_timeout_s is not None else worst
        if not self.call_timeout_s > 0:
            raise InputError(f"call_timeout_s must be > 0 seconds or None; got {call_timeout_s!r}")
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.unit = unit
        self._api_key = api_key
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        self._stats = _Stats()

    @property
    def has_api_key(self) -> bool:
        return bool(self._api_key)

    # ----------------------------------------------------------------------------------------------
    def run(
        self,
        bodies: Sequence[Mapping[str, Any]],
        parse: Callable[[httpx.Response, Mapping[str, Any]], T],
        labels: Sequence[str],
    ) -> list[T]:
        """POST every body; ``parse(response, body)`` of each (``ValueError`` = unusable), in input order.

        ``labels[i]`` names request ``i`` in errors (e.g. ``"routed pair 3"``). Raises
        :class:`CircuitOpenError` at once while the breaker is open, and :class:`FallbackError`
        when any request fails or the call deadline passes.
        """
        if not bodies:
            return []
        started = time.monotonic()
        try:
            results = self._run(bodies, parse, labels)
        except FallbackError as exc:
            self._stats.call(None, str(exc))
            raise
        self._stats.call(time.monotonic() - started)
        return results

    def _run(
        self,
        bodies: Sequence[Mapping[str, Any]],
        parse: Callable[[httpx.Response, Mapping[str, Any]], T],
        labels: Sequence[str],
    ) -> list[T]:
        out: list[Any] = [None] * len(bodies)
        probe = self.breaker.acquire()  # raises CircuitOpenError: nothing is sent
        call = _CallState(time.monotonic() + self.call_timeout_s)
        probe_future: Future[Any] | None = None

        def submit(indices: Iterable[int], is_probe: bool = False) -> dict[Future[Any], int]:
            try:
                return {
                    pool.submit(self._attempt, http, bodies[i], parse, labels[i], call, is_probe): i
                    for i in indices
                }
            except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
                raise FallbackError("the client was closed during the call") from exc

        try:
            http, pool = self._ensure_open()
            first = 0
            if probe:  # half-open: the first request alone decides whether the endpoint is back
                futures = submit([0], is_probe=True)
                probe_future = next(iter(futures))
                self._collect(call, futures, out)
                first = 1
            self._collect(call, submit(range(first, len(bodies))), out)
        finally:
            call.abandoned.set()  # stops retries of this call's stragglers; a no-op on success
            if probe and (probe_future is None or probe_future.cancelled()):
                self.breaker.release_probe()  # the probe never ran: let another caller probe
        return out

    def _collect(self, call: _CallState, futures: dict[Future[Any], int], out: list[Any]) -> None:
        """Wait for a batch of requests until the deadline; the first failure fails the call.

        Waits on done-callbacks rather than ``concurrent.futures.wait``, because a future that
        ``close()`` cancels (``shutdown(cancel_futures=True)``) runs its callbacks but never wakes
        ``wait``: the call would sit out its whole deadline.
        """
        if not futures:
            return
        finished: list[Future[Any]] = []
        changed = threading.Condition()

        def on_done(future: Future[Any]) -> None:
            with changed:
                finished.append(future)
                changed.notify()

        for future in futures:
            future.add_done_callback(on_done)
        remaining = set(futures)
        while remaining:
            with changed:
                while not finished and changed.wait(max(0.0, call.deadline - time.monotonic())):
                    pass
                batch, finished[:] = finished[:], []
            if not batch:  # the deadline passed
                self._abandon(call, remaining)
                raise FallbackError(
                    f"{len(remaining)} of {len(futures)} {self.unit} requests unanswered when the call "
                    f"deadline of {self.call_timeout_s:.2f} s passed ({self.endpoint}); raise "
                    "call_timeout_s or max_concurrency, or route fewer pairs"
                )
            for future in sorted(batch, key=futures.__getitem__):
                remaining.discard(future)
                exc = None if future.cancelled() else future.exception()
                if future.cancelled() or isinstance(exc, _Abandoned):
                    self._abandon(call, remaining)
                    raise FallbackError("the client was closed during the call")
                if exc is not None:
                    self._abandon(call, remaining)
                    raise exc
                out[futures[future]] = future.result()

    @staticmethod
    def _abandon(call: _CallState, pending: Iterable[Future[Any]]) -> None:
        call.abandoned.set()
        for future in pending:
            future.cancel()

    def _attempt(
        self,
        http: httpx.Client,
        body: Mapping[str, Any],
        parse: Callable[[httpx.Response, Mapping[str, Any]], T],
        label: str,
        call: _CallState,
        probe: bool,
    ) -> T:
        """One request: attempts, retries, parsing; reports its outcome to the breaker."""
        reported = False
        try:
            error, attempts = "", 0
            for attempt in range(self.retries + 1):
                if call.abandoned.is_set() or self._closing.is_set():
                    raise _Abandoned
                if not self.breaker.allows(probe):
                    raise CircuitOpenError(f"circuit breaker opened while {label} waited; not sent")
                remaining = call.deadline - time.monotonic()
                if remaining <= 0:
                    error = f"call deadline of {self.call_timeout_s:.2f} s passed"
                    break
                timeout = min(self.timeout_s, remaining)
                attempts += 1
                ok, value, error, retryable = self._post_once(http, body, parse, timeout)
                self._stats.request(not ok, error)
                if ok:
                    self.breaker.record_success()
                    reported = True
                    return cast(T, value)  # ok: parse gave the value
                logger.debug("%s attempt %d failed: %s", label, attempt + 1, error)
                if retryable and time.monotonic() >= call.deadline:
                    # the attempt's timeout was cut to what the call had left: say so, not just "timed out"
                    error = (
                        f"call deadline of {self.call_timeout_s:.2f} s passed (last attempt: {error}); "
                        "raise call_timeout_s, or route fewer pairs"
                    )
                    break
                if not retryable or attempt == self.retries:
                    break
                delay = self.backoff_s * 2**attempt * (0.5 + 0.5 * random.random())
                if call.abandoned.wait(min(delay, max(0.0, call.deadline - time.monotonic()))):
                    raise _Abandoned
            self.breaker.record_failure(error)
            reported = True
            raise FallbackError(f"{label}: {error} after {attempts} attempt(s) (POST {self.endpoint})")
        finally:
            if probe and not reported:
                self.breaker.release_probe()

    def _post_once(
        self,
        http: httpx.Client,
        body: Mapping[str, Any],
        parse: Callable[[httpx.Response, Mapping[str, Any]], T],
        timeout: float,
    ) -> tuple[bool, T | None, str, bool]:
        """``(ok, parsed, error, retryable)`` of one POST."""
        httpx = self._httpx
        try:
            response = http.post(self.endpoint, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            return False, None, f"timed out after {timeout:.2f} s ({type(exc).__name__})", True
        except httpx.TransportError as exc:
            return False, None, f"{type(exc).__name__}: {exc}", True
        status = response.status_code
        if status >= 400:
            retryable = status >= 500 or status in _RETRY_STATUS
            return False, None, f"HTTP {status}: {response.text[:200]!r}", retryable
        try:
            return True, parse(response, body), "", False
        except ValueError as exc:
            return False, None, f"unusable answer: {exc}", False

    # ----------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Breaker state and counters: what a node's ``/healthz`` and ``/metrics`` report.

        ``calls``/``failed_calls`` count fallback calls (a call failed fast by the open breaker
        included); ``requests``/``failures`` count HTTP requests (retries included; a failure is a
        transport error, timeout, HTTP error or unusable answer). Latencies are of answered calls,
        in milliseconds: the last one and the median of the last :data:`LATENCY_WINDOW`; None before
        the first.
        """
        stats = self._stats
        with stats.lock:
            latencies = list(stats.latencies_ms)
            counts = {
                "calls": stats.calls,
                "failed_calls": stats.failed_calls,
                "requests": stats.requests,
                "failures": stats.failures,
                "last_error": stats.last_error,
            }
        return {
            "endpoint": self.endpoint,
            "state": self.breaker.state,
            "consecutive_failures": self.breaker.consecutive_failures,
            **counts,
            "last_latency_ms": round(latencies[-1], 3) if latencies else None,
            "p50_latency_ms": round(statistics.median(latencies), 3) if latencies else None,
        }

    def _ensure_open(self) -> tuple[httpx.Client, ThreadPoolExecutor]:
        with self._lock:
            if self._http is None or self._pool is None:
                httpx = self._httpx
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._closing.clear()
                self._http = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout_s),
                    limits=httpx.Limits(
                        max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
                    ),
                )
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="darl-llm")
            return self._http, self._pool

    def close(self) -> None:
        """Stop pending work, wait for in-flight requests (at most ``timeout_s``), close connections."""
        with self._lock:
            http, pool = self._http, self._pool
            self._http = self._pool = None
            self._closing.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if http is not None:
            http.close()


__all__ = ["LATENCY_WINDOW", "HTTPTransport", "import_httpx"]
