"""Errors of the LLM fallback clients.

They subclass :class:`darl_lite.errors.DarlLiteError`, so a caller that embeds the runtime can tell a
documented fallback failure from a bug. The scorer catches them and keeps the student's answer, with
the message in ``PairScore.note``; called directly (e.g. to grade a data set) they propagate.
"""

from __future__ import annotations

from darl_lite.errors import DarlLiteError


class FallbackError(DarlLiteError, RuntimeError):
    """The LLM could not grade a call's pairs: transport error, timeout, HTTP error or an answer
    without usable grade-token logprobs. The message names the pair, the endpoint and the cause."""


class CircuitOpenError(FallbackError):
    """The circuit breaker is open after repeated failures: the call failed fast, nothing was sent."""
