"""A circuit breaker: stop calling an LLM endpoint that keeps failing, and try it again later.

States (thread-safe; one breaker may guard a client that many request threads share):

* **closed** — calls go through; consecutive failures are counted, a success resets the count.
* **open** — after ``failure_threshold`` consecutive failures. Calls fail at once with
  :class:`~darl_lite.llm.errors.CircuitOpenError` and nothing touches the network, so a dead or
  overloaded LLM costs the search node microseconds instead of a timeout per call, and the LLM gets
  room to recover.
* **half-open** — once ``reset_timeout_s`` has passed since it opened. Exactly one caller gets a
  probe (:meth:`CircuitBreaker.acquire` returns True); everyone else still fails fast. The probe's
  success closes the breaker; its failure opens it for another cool-down. A probe that reports
  nothing within ``reset_timeout_s`` (its thread died) is replaced by a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from darl_lite.errors import InputError
from darl_lite.llm.errors import CircuitOpenError

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Counts consecutive failures and fails calls fast while the endpoint is presumed down.

    ``clock`` (seconds, monotonic) is injectable so a caller can share a time source; tests use
    the real one with a short ``reset_timeout_s``.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise InputError(f"failure_threshold must be an int >= 1; got {failure_threshold!r}")
        if not reset_timeout_s > 0:
            raise InputError(f"reset_timeout_s must be > 0 seconds; got {reset_timeout_s!r}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = float(reset_timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self._last_error = ""

    # ----------------------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current state; ``open`` turns into ``half_open`` here once the cool-down is over."""
        with self._lock:
            return self._advance()

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    def acquire(self) -> bool:
        """Ask to make a call. Returns False for an ordinary call (closed), True when the caller
        is the half-open probe and must report its outcome; raises :class:`CircuitOpenError`
        (fail fast, send nothing) otherwise."""
        with self._lock:
            state = self._advance()
            if state == "closed":
                return False
            now = self._clock()
            if state == "half_open" and (
                self._probe_started is None or now - self._probe_started >= self.reset_timeout_s
            ):
                self._probe_started = now
                logger.info("circuit breaker half-open: letting one probe through")
                return True
            wait = max(0.0, self._opened_at + self.reset_timeout_s - now)
            detail = f"; next probe in {wait:.2f} s" if state == "open" else "; a probe is in flight"
            raise CircuitOpenError(
                f"circuit breaker is {state.replace('_', '-')} after {self._failures} consecutive "
                f"failures (last: {self._last_error}){detail}"
            )

    def allows(self, probe: bool = False) -> bool:
        """Whether a request may go out now: always when closed, only the probe's when half-open."""
        with self._lock:
            state = self._advance()
            return state == "closed" or (probe and state == "half_open")

    def record_success(self) -> None:
        """A request succeeded: reset the count; a probe's success closes the breaker."""
        with self._lock:
            if self._state == "half_open":
                logger.info("circuit breaker closed: the probe succeeded")
            if self._state != "open":  # a stale success from before the breaker opened changes nothing
                self._state = "closed"
                self._failures = 0
                self._probe_started = None

    def record_failure(self, reason: str = "") -> None:
        """A request failed (after its retries): count it; at the threshold, or on a failed probe, open."""
        with self._lock:
            self._last_error = reason or "unknown error"
            self._failures += 1
            if self._state == "half_open" or (
                self._state == "closed" and self._failures >= self.failure_threshold
            ):
                logger.warning(
                    "circuit breaker open for %.2f s after %d consecutive failures (last: %s)",
                    self.reset_timeout_s,
                    self._failures,
                    self._last_error,
                )
                self._state = "open"
                self._opened_at = self._clock()
                self._probe_started = None

    def release_probe(self) -> None:
        """The probe ended without an outcome (its call was abandoned): let another caller probe."""
        with self._lock:
            self._probe_started = None

    def reset(self) -> None:
        """Close the breaker and forget past failures (e.g. after the endpoint was replaced)."""
        with self._lock:
            self._state, self._failures, self._probe_started = "closed", 0, None

    def _advance(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._state = "half_open"
            self._probe_started = None
        return self._state

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state!r}, failure_threshold={self.failure_threshold}, "
            f"reset_timeout_s={self.reset_timeout_s})"
        )


__all__ = ["BreakerState", "CircuitBreaker"]
