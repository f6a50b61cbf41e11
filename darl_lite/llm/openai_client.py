"""Grade pairs with an LLM behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp, TGI).

For each pair the client sends one ``POST {base_url}/v1/completions`` with the rendered prompt,
``max_tokens=1``, ``temperature=0`` and ``logprobs=top_logprobs``, reads the first generated token's
candidates (``choices[0].logprobs.top_logprobs[0]``, a ``{token: logprob}`` map; the chat-style
``logprobs.content[0].top_logprobs`` list that newer llama.cpp servers send is read too), and turns
the grade tokens' logprobs into grade probabilities (:mod:`darl_lite.llm.prompt`).

An instance is a :data:`darl_lite.Fallback`: ``client(pairs)`` returns one probability row per
pair, in order. Timeouts, retries with backoff, the concurrency cap, the call deadline and the circuit
breaker are :mod:`darl_lite.llm.transport`'s (shared with
:class:`~darl_lite.llm.classify_client.ClassifyGradeClient`): here one request carries one pair, and
**one failed pair fails the whole call** (:class:`FallbackError`).

``httpx`` comes with the ``llm`` extra; constructing a client without it raises
:class:`~darl_lite.errors.MissingExtraError` (at configuration time, not silently at the first call).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError
from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.client_base import TransportClient, response_json
from darl_lite.llm.prompt import (
    DEFAULT_GRADE_TOKENS,
    DEFAULT_PROMPT,
    PromptTemplate,
    check_grade_tokens,
    grade_logprobs_from_top,
    grade_probabilities,
)
from darl_lite.llm.validate import check_int, check_pairs

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)


class OpenAIGradeClient(TransportClient):
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

    protocol = "completions"

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
        if not isinstance(model, str) or not model:
            raise InputError(f"model must be the served model's name (see GET /v1/models); got {model!r}")
        check_int(top_logprobs, "top_logprobs", 1)
        self._open_transport(
            base_url,
            "/v1/completions",
            "pair",
            timeout_s=timeout_s,
            call_timeout_s=call_timeout_s,
            max_concurrency=max_concurrency,
            retries=retries,
            backoff_s=backoff_s,
            api_key=api_key,
            breaker=breaker,
        )
        self.model = model
        self.grade_tokens = check_grade_tokens(grade_tokens)
        self.prompt = PromptTemplate.coerce(prompt_template)
        self.top_logprobs = top_logprobs
        self.extra_body = dict(extra_body or {})

    # ----------------------------------------------------------------------------------------------
    def __call__(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
        """Grade probabilities ``(len(pairs), len(grade_tokens))`` in input order.

        Raises :class:`CircuitOpenError` at once while the breaker is open, and
        :class:`FallbackError` when any pair fails or the call deadline passes.
        """
        pairs = check_pairs(pairs)
        if not pairs:
            return np.empty((0, len(self.grade_tokens)), np.float64)
        bodies = [
            {
                **self.extra_body,
                "model": self.model,
                "prompt": self.prompt.render(*pair),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": self.top_logprobs,
            }
            for pair in pairs
        ]
        rows = self.transport.run(bodies, self._parse, [f"routed pair {i}" for i in range(len(pairs))])
        return np.stack(rows).astype(np.float64, copy=False)

    def _parse(self, response: httpx.Response, _body: Mapping[str, Any]) -> NDArray[np.float64]:
        """Grade probabilities from one completion; ``ValueError`` saying what was wrong otherwise."""
        data = response_json(response)
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

    def __repr__(self) -> str:
        return (
            f"OpenAIGradeClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"grade_tokens={self.grade_tokens!r}, {self._repr_settings()})"
        )


__all__ = ["OpenAIGradeClient"]
