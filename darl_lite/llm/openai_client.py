"""Grade pairs with an LLM behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp, TGI).

For each pair the client sends one ``POST {base_url}/v1/completions`` with the rendered prompt,
``max_tokens=1``, ``temperature=0`` and ``logprobs=top_logprobs``, reads the first generated token's
candidates (``choices[0].logprobs.top_logprobs[0]``, a ``{token: logprob}`` map; the chat-style
``logprobs.content[0].top_logprobs`` list that newer llama.cpp servers send is read too), and turns
the grade tokens' logprobs into grade probabilities (:mod:`darl_lite.llm.prompt`).

An instance is a :data:`darl_lite.Fallback`: ``client(pairs)`` returns one probability row per
pair, in order. **One failed pair fails the whole call** (it raises :class:`FallbackError`): the
scorer's contract is one array for all routed pairs and it rejects an array with holes anyway, so
raising at the first failure stops the call's remaining requests, returns within the deadline, and
gives the scorer a precise reason to keep the student's answers (in ``PairScore.note``).

Robustness, in the order a request meets it:

* **Circuit breaker** (:class:`~darl_lite.llm.breaker.CircuitBreaker`): while open, calls fail fast
  with :class:`CircuitOpenError` and send nothing; half-open, the call's first pair is the probe.
  It counts pairs, not attempts: a pair whose retries ran out, that got a 4xx, or whose answer was
  unusable is one failure; any pair answered resets the count.
* **Concurrency limit**: one bounded thread pool (``max_concurrency``) per client, shared by every
  thread that calls it, so the LLM never sees more than that many requests from this client.
* **Connection reuse**: one ``httpx.Client`` (thread-safe, keep-alive), created on first use.
* **Per-request timeout** ``timeout_s`` (connect, read, write, pool), and a **call deadline**
  ``call_timeout_s`` that bounds how long the caller waits, however many pairs are queued.
* **Retries** with exponential backoff and jitter on connection errors, timeouts, 5xx, 408 and 429;
  never on other 4xx (a bad model name or an over-long prompt does not heal) nor on an unusable answer.

``httpx`` comes with the ``llm`` extra; constructing a client without it raises
:class:`~darl_lite.errors.MissingExtraError` (at configuration time, not silently at the first call).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.errors import CircuitOpenError, FallbackError
from darl_lite.llm.prompt import (
    DEFAULT_GRADE_TOKENS,
    DEFAULT_PROMPT,
    PromptTemplate,
    check_grade_tokens,
    grade_logprobs_from_top,
    grade_probabilities,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

#: HTTP statuses worth another attempt: server errors, request timeout, rate limiting.
_RETRY_STATUS = frozenset({408, 429})


def _import_httpx() -> ModuleType:
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


class OpenAIGradeClient:
    """A :data:`darl_lite.Fallback` that grades pairs with an OpenAI-compatible completions server.

    ``base_url`` is the server root, with or without the ``/v1`` suffix (``http://127.0.0.1:8000``
    and ``http://127.0.0.1:8000/v1`` both work). ``grade_tokens[g]`` is the token that stands for
    grade ``g`` in the bundle's grade order; each must be a single token of the served model's
    tokenizer. ``top_logprobs`` is how many next-token candidates to ask for (vLLM allows 20 by
    default; OpenAI's legacy API 5): the grade tokens must be among them. ``call_timeout_s`` defaults
    to the worst case of one request: ``(retries + 1) × timeout_s`` plus the backoff sleeps.
    ``extra_body`` is merged into every request (e.g. ``{"top_k": 1}`` or llama.cpp's
    ``{"cache_prompt": True}``). The ``api_key`` is sent as a bearer token and never logged or shown.

    Thread-safe. :meth:`close` (or ``with``) releases connections and worker threads; a later call
    opens them again.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        grade_tokens: Sequence[str] = DEFAULT_GRADE_TOKENS,
        prompt_template: str | PromptTemplate = DEFAULT_PROMPT,
        top_logprobs: int = 20,
        timeout_s: float = 2.0,
        call_timeout_s: float | None = None,
        max_concurrency: int = 8,
        retries: int = 2,
        backoff_s: float = 0.05,
        api_key: str | None = None,
        breaker: CircuitBreaker | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self._httpx = _import_httpx()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url must be an http:// or https:// URL; got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise InputError(f"model must be the served model's name (see GET /v1/models); got {model!r}")
        _check_int(top_logprobs, "top_logprobs", 1)
        _check_int(max_concurrency, "max_concurrency", 1)
        _check_int(retries, "retries", 0)
        if not timeout_s > 0:
            raise InputError(f"timeout_s must be > 0 seconds; got {timeout_s!r}")
        if not backoff_s >= 0:
            raise InputError(f"backoff_s must be >= 0 seconds; got {backoff_s!r}")
        root = base_url.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.base_url = root
        self.endpoint = f"{root}/v1/completions"
        self.model = model
        self.grade_tokens = check_grade_tokens(grade_tokens)
        self.prompt = PromptTemplate.coerce(prompt_template)
        self.top_logprobs = top_logprobs
        self.timeout_s = float(timeout_s)
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff_s = float(backoff_s)
        worst = (retries + 1) * self.timeout_s + sum(self.backoff_s * 2**a for a in range(retries))
        self.call_timeout_s = float(call_timeout_s) if call_timeout_s is not None else worst
        if not self.call_timeout_s > 0:
            raise InputError(f"call_timeout_s must be > 0 seconds or None; got {call_timeout_s!r}")
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.extra_body = dict(extra_body or {})
        self._api_key = api_key
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closing = threading.Event()

    # ----------------------------------------------------------------------------------------------
    def __call__(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
        """Grade probabilities ``(len(pairs), len(grade_tokens))`` in input order.

        Raises :class:`CircuitOpenError` at once while the breaker is open, and
        :class:`FallbackError` when any pair fails or the call deadline passes.
        """
        pairs = _check_pairs(pairs)
        out = np.empty((len(pairs), len(self.grade_tokens)), np.float64)
        if not pairs:
            return out
        probe = self.breaker.acquire()  # raises CircuitOpenError: nothing is sent
        call = _CallState(time.monotonic() + self.call_timeout_s)
        probe_future: Future[NDArray[np.float64]] | None = None
        try:
            http, pool = self._ensure_open()
            first = 0
            if probe:  # half-open: the first pair alone decides whether the endpoint is back
                futures = self._submit(pool, http, [0], pairs, call, probe=True)
                probe_future = next(iter(futures))
                self._collect(call, futures, out)
                first = 1
            self._collect(call, self._submit(pool, http, range(first, len(pairs)), pairs, call), out)
        finally:
            call.abandoned.set()  # stops retries of this call's stragglers; a no-op on success
            if probe and (probe_future is None or probe_future.cancelled()):
                self.breaker.release_probe()  # the probe never ran: let another caller probe
        return out

    def _submit(
        self,
        pool: ThreadPoolExecutor,
        http: httpx.Client,
        indices: Iterable[int],
        pairs: list[tuple[str, str]],
        call: _CallState,
        probe: bool = False,
    ) -> dict[Future[NDArray[np.float64]], int]:
        try:
            return {pool.submit(self._grade_one, http, i, pairs[i], call, probe): i for i in indices}
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            raise FallbackError("the client was closed during the call") from exc

    def _collect(
        self, call: _CallState, futures: dict[Future[NDArray[np.float64]], int], out: NDArray[np.float64]
    ) -> None:
        """Wait for a batch of pair requests until the deadline; the first failure fails the call.

        Waits on done-callbacks rather than ``concurrent.futures.wait``, because a future that
        ``close()`` cancels (``shutdown(cancel_futures=True)``) runs its callbacks but never wakes
        ``wait``: the call would sit out its whole deadline.
        """
        if not futures:
            return
        finished: list[Future[NDArray[np.float64]]] = []
        changed = threading.Condition()

        def on_done(future: Future[NDArray[np.float64]]) -> None:
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
                    f"{len(remaining)} of {len(futures)} pairs unanswered when the call deadline of "
                    f"{self.call_timeout_s:.2f} s passed ({self.endpoint}); raise call_timeout_s or "
                    "max_concurrency, or route fewer pairs"
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
    def _abandon(call: _CallState, pending: Iterable[Future[NDArray[np.float64]]]) -> None:
        call.abandoned.set()
        for future in pending:
            future.cancel()

    def _grade_one(
        self, http: httpx.Client, index: int, pair: tuple[str, str], call: _CallState, probe: bool
    ) -> NDArray[np.float64]:
        """One pair: request, retries, parsing; reports the pair's outcome to the breaker."""
        httpx = self._httpx
        body = {
            **self.extra_body,
            "model": self.model,
            "prompt": self.prompt.render(*pair),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": self.top_logprobs,
        }
        reported = False
        try:
            error = ""
            attempts = 0
            for attempt in range(self.retries + 1):
                if call.abandoned.is_set() or self._closing.is_set():
                    raise _Abandoned
                if not self.breaker.allows(probe):
                    raise CircuitOpenError(f"circuit breaker opened while pair {index} waited; not sent")
                remaining = call.deadline - time.monotonic()
                if remaining <= 0:
                    error = f"call deadline of {self.call_timeout_s:.2f} s passed"
                    break
                timeout = min(self.timeout_s, remaining)
                attempts += 1
                retryable = True
                try:
                    response = http.post(self.endpoint, json=body, timeout=timeout)
                except httpx.TimeoutException as exc:
                    error = f"timed out after {timeout:.2f} s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    status = response.status_code
                    if status >= 400:
                        error = f"HTTP {status}: {response.text[:200]!r}"
                        retryable = status >= 500 or status in _RETRY_STATUS
                    else:
                        try:
                            probs = self._parse(response)
                        except ValueError as exc:
                            error = f"unusable answer: {exc}"
                            retryable = False
                        else:
                            self.breaker.record_success()
                            reported = True
                            return probs
                logger.debug("pair %d attempt %d failed: %s", index, attempt + 1, error)
                if not retryable or attempt == self.retries:
                    break
                delay = self.backoff_s * 2**attempt * (0.5 + 0.5 * random.random())
                if call.abandoned.wait(min(delay, max(0.0, call.deadline - time.monotonic()))):
                    raise _Abandoned
            self.breaker.record_failure(error)
            reported = True
            raise FallbackError(
                f"routed pair {index}: {error} after {attempts} attempt(s) (POST {self.endpoint})"
            )
        finally:
            if probe and not reported:
                self.breaker.release_probe()

    def _parse(self, response: httpx.Response) -> NDArray[np.float64]:
        """Grade probabilities from one completion; ``ValueError`` saying what was wrong otherwise."""
        try:
            data = response.json()
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"body is not JSON ({exc}): {response.text[:120]!r}") from exc
        try:
            choice = data["choices"][0]
            logprobs = choice.get("logprobs")
            if not isinstance(logprobs, dict):
                raise ValueError(
                    "the completion has no logprobs; the server must support 'logprobs' on "
                    "/v1/completions (vLLM, llama.cpp's server and TGI do)"
                )
            top: Any = logprobs.get("top_logprobs")
            if isinstance(top, list) and top:
                candidates = top[0]
            elif isinstance(logprobs.get("content"), list) and logprobs["content"]:
                entries = logprobs["content"][0]["top_logprobs"]
                candidates = {e["token"]: e["logprob"] for e in entries}
            else:
                raise ValueError("logprobs carry no top_logprobs for the first token")
            if not isinstance(candidates, dict) or not candidates:
                raise ValueError(
                    f"top_logprobs[0] must be a non-empty {{token: logprob}} map; got {candidates!r:.120}"
                )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"not a completions response ({type(exc).__name__}: {exc}): {data!r:.120}"
            ) from exc
        grade_lp = grade_logprobs_from_top(candidates, self.grade_tokens)
        if not np.isfinite(grade_lp).any():
            shown = sorted(candidates, key=lambda t: -float(candidates[t]))[:8]
            raise ValueError(
                f"none of the grade tokens {list(self.grade_tokens)} is among the {len(candidates)} "
                f"candidates (top: {shown}); check grade_tokens and the prompt, or raise top_logprobs"
            )
        return grade_probabilities(grade_lp)

    # ----------------------------------------------------------------------------------------------
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

    def __enter__(self) -> OpenAIGradeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAIGradeClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"grade_tokens={self.grade_tokens!r}, timeout_s={self.timeout_s}, "
            f"max_concurrency={self.max_concurrency}, retries={self.retries}, "
            f"api_key={'<set>' if self._api_key else None}, breaker={self.breaker!r})"
        )


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_pairs(pairs: object) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InputError(f"pairs must be a list of (query, item) tuples; got {type(pairs).__name__}")
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise InputError(f"pairs[{i}] must be a (query, item) tuple of two strings; got {pair!r:.80}")
        out.append((pair[0], pair[1]))
    return out


__all__ = ["OpenAIGradeClient"]
