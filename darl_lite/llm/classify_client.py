"""Grade pairs with a sequence classifier behind vLLM's classification endpoint (``POST /classify``).

The tuned teacher (LLM + probe head) answers grade probabilities directly, so the wire protocol is
vLLM's classification API rather than completions with logprobs. Each pair is rendered with the
teacher's template (:mod:`darl_lite.llm.pair_text`), the texts go in batches of ``batch_size``::

    POST {base_url}/classify   {"model": "teacher", "input": ["Query: ...\\nEntity: ...\\nRelevance:", ...]}
    200 {"id": "classify-...", "object": "list", "created": 1700000000, "model": "teacher",
         "data": [{"index": 0, "label": "strong", "probs": [0.1, 0.2, 0.7], "num_classes": 3}, ...],
         "usage": {"prompt_tokens": 25, "total_tokens": 25, "completion_tokens": 0}}

and ``data[i].probs`` (by ``index``) is pair ``i``'s row. darl-lite's own teacher server
(``darl-lite distill serve-teacher``) speaks it, and so does vLLM for any
``*ForSequenceClassification`` folder (``vllm serve MODEL --task classify``).

Timeouts, retries, the concurrency cap, the call deadline and the breaker are those of
:mod:`darl_lite.llm.transport`: here one request carries one batch, and one failed batch fails the
call. ``httpx`` comes with the ``llm`` extra.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError
from darl_lite.llm.breaker import CircuitBreaker
from darl_lite.llm.client_base import TransportClient, response_json
from darl_lite.llm.pair_text import TEACHER_TEMPLATE, PairText
from darl_lite.llm.validate import check_int, check_pairs

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

#: How far a row of probabilities may sum from 1 and still be read as a distribution.
PROB_SUM_TOL = 1e-3


class ClassifyGradeClient(TransportClient):
    """A :data:`darl_lite.Fallback` that grades pairs with a classification server (vLLM's protocol).

    ``base_url`` is the server root (a trailing ``/v1`` is dropped). ``model`` is sent when given
    (vLLM then checks it; None lets the server use the model it serves). ``template`` renders a pair
    into the text the served classifier was trained on; ``max_field_chars`` cuts each text first so
    a huge item cannot blow up a request (the shipped teacher reads 96 tokens anyway). ``n_grades``
    is how many probabilities each answer must carry. ``call_timeout_s`` defaults to the worst case
    of one request. ``api_key`` is sent as a bearer token and never logged or shown.

    Thread-safe. :meth:`close` (or ``with``) releases connections and worker threads.
    """

    protocol = "classify"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        template: str = TEACHER_TEMPLATE,
        n_grades: int = 3,
        batch_size: int = 16,
        max_field_chars: int | None = 4000,
        timeout_s: float = 10.0,
        call_timeout_s: float | None = None,
        max_concurrency: int = 4,
        retries: int = 2,
        backoff_s: float = 0.05,
        api_key: str | None = None,
        breaker: CircuitBreaker | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if model is not None and (not isinstance(model, str) or not model):
            raise InputError(f"model must be the served model's name (GET /v1/models) or None; got {model!r}")
        check_int(n_grades, "n_grades", 2)
        check_int(batch_size, "batch_size", 1)
        if max_field_chars is not None:
            check_int(max_field_chars, "max_field_chars", 1)
        self._open_transport(
            base_url,
            "/classify",
            "batch",
            timeout_s=timeout_s,
            call_timeout_s=call_timeout_s,
            max_concurrency=max_concurrency,
            retries=retries,
            backoff_s=backoff_s,
            api_key=api_key,
            breaker=breaker,
        )
        self.model = model
        self.text = PairText(template)
        self.n_grades = n_grades
        self.batch_size = batch_size
        self.max_field_chars = max_field_chars
        self.extra_body = dict(extra_body or {})

    def render(self, query: str, item: str) -> str:
        """The text sent for one pair (fields cut to ``max_field_chars``)."""
        cut = self.max_field_chars
        if cut is not None:
            query, item = query[:cut], item[:cut]
        return self.text.render(query, item)

    # ----------------------------------------------------------------------------------------------
    def __call__(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float32]:
        """Grade probabilities ``(len(pairs), n_grades)`` float32, in input order.

        Raises :class:`~darl_lite.llm.CircuitOpenError` at once while the breaker is open, and
        :class:`~darl_lite.llm.FallbackError` when any batch fails or the call deadline passes.
        """
        pairs = check_pairs(pairs)
        if not pairs:
            return np.empty((0, self.n_grades), np.float32)
        texts = [self.render(q, i) for q, i in pairs]
        bodies: list[dict[str, Any]] = []
        labels: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            body: dict[str, Any] = {**self.extra_body, "input": chunk}
            if self.model is not None:
                body["model"] = self.model
            bodies.append(body)
            labels.append(f"routed pairs {start}-{start + len(chunk) - 1}")
        blocks = self.transport.run(bodies, self._parse, labels)
        return np.concatenate(blocks).astype(np.float32, copy=False)

    def _parse(self, response: httpx.Response, body: Mapping[str, Any]) -> NDArray[np.float32]:
        return parse_classification(response, len(body["input"]), self.n_grades)

    def __repr__(self) -> str:
        return (
            f"ClassifyGradeClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"batch_size={self.batch_size}, {self._repr_settings()})"
        )


def parse_classification(response: httpx.Response, n: int, n_grades: int) -> NDArray[np.float32]:
    """``(n, n_grades)`` rows from a classification response; ``ValueError`` saying what was wrong."""
    data = response_json(response)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"not a classification response (no 'data' list): {data!r:.120}")
    if len(rows) != n:
        raise ValueError(f"{len(rows)} results for {n} inputs")
    out = np.empty((n, n_grades), np.float32)
    seen: set[int] = set()
    for position, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"data[{position}] is not an object: {row!r:.80}")
        index = row.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n or index in seen:
            raise ValueError(f"data[{position}].index must be a distinct int in [0, {n}); got {index!r}")
        seen.add(index)
        out[index] = _probs_of(row, position, n_grades)
    return out


def _probs_of(row: Mapping[str, Any], position: int, n_grades: int) -> list[float]:
    probs = row.get("probs", row.get("probabilities"))
    if not isinstance(probs, list) or not all(
        isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs
    ):
        raise ValueError(f"data[{position}].probs must be a list of numbers; got {probs!r:.80}")
    if len(probs) != n_grades:
        raise ValueError(
            f"data[{position}] has {len(probs)} probabilities; the bundle grades {n_grades}: serve a "
            f"classifier with {n_grades} labels in the bundle's grade order"
        )
    values = [float(p) for p in probs]
    if not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1.0) > PROB_SUM_TOL:
        raise ValueError(f"data[{position}].probs must be finite, >= 0 and sum to 1; got {values}")
    return values


__all__ = ["PROB_SUM_TOL", "ClassifyGradeClient", "parse_classification"]
