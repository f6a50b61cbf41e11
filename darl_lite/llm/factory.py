"""Build a fallback client from a URL and a few settings: what ``darl-lite serve`` / ``score`` call.

Two protocols:

* ``"classify"`` (default): vLLM's classification API, ``POST /classify`` with the pairs rendered by
  the teacher's template; the tuned teacher (``darl-lite distill serve-teacher``) and vLLM serving a
  ``*ForSequenceClassification`` folder both answer it (:class:`ClassifyGradeClient`).
* ``"completions"``: an OpenAI-compatible completions server graded from the grade tokens' logprobs
  (:class:`OpenAIGradeClient`); ``model`` is required there.

Every client returned has the :class:`GradeClient` shape: a :data:`darl_lite.Fallback` plus
``health()`` and ``close()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from numpy.typing import ArrayLike

from darl_lite.errors import InputError
from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.classify_client import ClassifyGradeClient
from darl_lite.llm.openai_client import OpenAIGradeClient

PROTOCOLS: tuple[str, ...] = ("classify", "completions")
#: Per-request timeout by protocol when none is given: a batch of pairs through an LLM forward pass
#: (classify) takes longer than one token of one completion.
DEFAULT_TIMEOUT_S = {"classify": 10.0, "completions": 2.0}
DEFAULT_CONCURRENCY = {"classify": 4, "completions": 8}


@runtime_checkable
class GradeClient(Protocol):
    """What a node needs of an LLM fallback: grade pairs, report its health, release resources."""

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> ArrayLike: ...

    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def fallback_from_url(
    url: str,
    *,
    protocol: str = "classify",
    model: str | None = None,
    timeout_s: float | None = None,
    call_timeout_s: float | None = None,
    retries: int = 2,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    breaker: CircuitBreaker | None = None,
    **options: Any,
) -> ClassifyGradeClient | OpenAIGradeClient:
    """A fallback client for ``url`` speaking ``protocol``; nothing is sent until the first call.

    ``timeout_s`` and ``max_concurrency`` default per protocol (:data:`DEFAULT_TIMEOUT_S`,
    :data:`DEFAULT_CONCURRENCY`); ``call_timeout_s`` defaults to the worst case of one request.
    ``options`` go to the client's constructor (e.g. ``batch_size`` or ``template`` for classify,
    ``grade_tokens`` or ``prompt_template`` for completions). Raises :class:`InputError` for an
    unknown protocol, a completions client without ``model``, or a bad setting.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {list(PROTOCOLS)}; got {protocol!r}")
    common: dict[str, Any] = {
        "timeout_s": DEFAULT_TIMEOUT_S[protocol] if timeout_s is None else timeout_s,
        "call_timeout_s": call_timeout_s,
        "retries": retries,
        "max_concurrency": DEFAULT_CONCURRENCY[protocol] if max_concurrency is None else max_concurrency,
        "api_key": api_key,
        "breaker": breaker,
        **options,
    }
    if protocol == "classify":
        return ClassifyGradeClient(url, model, **common)
    if model is None:
        raise InputError(
            "the completions protocol needs the served model's name (GET /v1/models lists it): pass "
            "model=... (--fallback-model on the command line)"
        )
    return OpenAIGradeClient(url, model, **common)


__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_TIMEOUT_S", "PROTOCOLS", "GradeClient", "fallback_from_url"]
