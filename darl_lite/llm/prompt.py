"""Prompts and grade tokens: how an LLM's next-token distribution becomes grade probabilities.

An LLM grader is asked, by a prompt that ends where the grade is due (``... Grade:``), for one token.
The log-probabilities of the grade tokens (``"0"``, ``"1"``, ``"2"``, or names such as ``"weak"``)
among that token's candidates, renormalised over the grades with a softmax, are the grade
probabilities. The HTTP client (:mod:`darl_lite.llm.openai_client`) and the in-process grader
(:mod:`darl_lite.distill.local_llm`) share this module, so the two give the same numbers for the
same model.

Tokens are matched after :func:`normalize_token`: servers report a candidate as its decoded text,
often with a leading space (``" 1"``) or a tokenizer's word marker (``"▁1"``, ``"Ġ1"``); every
variant that normalises to a grade token adds its probability to that grade.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from darl_lite.errors import InputError

#: The default grading prompt; ``{query}`` and ``{item}`` are filled in, the model answers one token.
DEFAULT_PROMPT = (
    "Judge how relevant the item is to the search query.\n"
    "Answer with one digit: 0 = irrelevant, 1 = partially relevant, 2 = highly relevant.\n"
    "Query: {query}\n"
    "Item: {item}\n"
    "Grade:"
)
#: Grade tokens of the shipped grade scheme (index = grade: irrelevant, weak, strong).
DEFAULT_GRADE_TOKENS: tuple[str, ...] = ("0", "1", "2")

# Word-boundary markers that tokenizers put in raw token strings: SentencePiece's "▁",
# byte-level BPE's "Ġ" (space) and "Ċ" (newline).
_MARKERS = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": "\n"})


def normalize_token(text: str) -> str:
    """A candidate token's text as compared with the grade tokens: markers to spaces, then stripped."""
    return text.translate(_MARKERS).strip()


def check_grade_tokens(grade_tokens: Sequence[str]) -> tuple[str, ...]:
    """Validate grade tokens (index = grade) and return them normalised.

    Raises :class:`InputError` when one is not a string, is empty after normalisation, or two
    normalise to the same text (a candidate token could then not be assigned to one grade).
    """
    if isinstance(grade_tokens, str) or not isinstance(grade_tokens, Sequence):
        raise InputError(
            f"grade_tokens must be a sequence of strings, one per grade (e.g. ('0', '1', '2')); "
            f"got {grade_tokens!r}"
        )
    if len(grade_tokens) < 2:
        raise InputError(f"grade_tokens must name at least two grades; got {list(grade_tokens)!r}")
    normalized: list[str] = []
    for i, token in enumerate(grade_tokens):
        if not isinstance(token, str) or not normalize_token(token):
            raise InputError(f"grade_tokens[{i}] must be a non-empty string such as '1'; got {token!r}")
        normalized.append(normalize_token(token))
    if len(set(normalized)) != len(normalized):
        raise InputError(f"grade_tokens must differ after stripping whitespace; got {list(grade_tokens)!r}")
    return tuple(normalized)


@dataclass(frozen=True)
class PromptTemplate:
    """A ``str.format`` template with the fields ``{query}`` and ``{item}`` (literal braces doubled).

    ``max_field_chars`` cuts each text to that many characters before it is filled in, so one huge
    item cannot push a prompt past the LLM's context (which fails the request); None keeps texts whole.
    """

    template: str = DEFAULT_PROMPT
    max_field_chars: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise InputError(f"prompt template must be a string; got {type(self.template).__name__}")
        if "{query}" not in self.template or "{item}" not in self.template:
            raise InputError(
                f"prompt template must contain both '{{query}}' and '{{item}}'; got {self.template!r}"
            )
        try:
            self.template.format(query="", item="")
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(
                f"prompt template has a field other than {{query}} and {{item}} ({exc!r}); double "
                "literal braces ('{{' and '}}'): got " + repr(self.template)
            ) from exc
        if self.max_field_chars is not None and self.max_field_chars < 1:
            raise InputError(f"max_field_chars must be >= 1 or None; got {self.max_field_chars}")

    @classmethod
    def coerce(cls, value: str | PromptTemplate) -> PromptTemplate:
        """Accept a template string or a :class:`PromptTemplate`."""
        return value if isinstance(value, PromptTemplate) else cls(value)

    def render(self, query: str, item: str) -> str:
        """The prompt for one pair."""
        if self.max_field_chars is not None:
            query, item = query[: self.max_field_chars], item[: self.max_field_chars]
        return self.template.format(query=query, item=item)


def grade_logprobs_from_top(
    top_logprobs: Mapping[str, float], grade_tokens: Sequence[str]
) -> NDArray[np.float64]:
    """Per-grade log-probability from a ``{token text: logprob}`` map of next-token candidates.

    Variants of one grade (``"1"``, ``" 1"``) are combined by log-sum-exp; a grade with no candidate
    gets ``-inf``. ``grade_tokens`` must already be normalised (:func:`check_grade_tokens`).
    Raises ``ValueError`` when a logprob is not a finite-or-minus-infinity number.
    """
    index = {token: g for g, token in enumerate(grade_tokens)}
    per_grade: list[list[float]] = [[] for _ in grade_tokens]
    for token, logprob in top_logprobs.items():
        if not isinstance(token, str):
            raise ValueError(f"candidate token must be a string; got {token!r}")
        if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
            raise ValueError(f"logprob of {token!r} must be a number; got {logprob!r}")
        value = float(logprob)
        if math.isnan(value) or value == math.inf:
            raise ValueError(f"logprob of {token!r} must be finite or -inf; got {logprob!r}")
        g = index.get(normalize_token(token))
        if g is not None:
            per_grade[g].append(value)
    out = np.full(len(grade_tokens), -np.inf)
    for g, values in enumerate(per_grade):
        if values:
            out[g] = float(np.logaddexp.reduce(np.asarray(values, np.float64)))
    return out


def grade_probabilities(grade_logprobs: NDArray[np.floating]) -> NDArray[np.float64]:
    """Softmax over the grades of per-grade log-probabilities ``(..., n_grades)``.

    Raises ``ValueError`` when a row has no finite entry (no grade token among the candidates).
    """
    z = np.asarray(grade_logprobs, np.float64)
    top = z.max(axis=-1, keepdims=True)
    if not np.all(np.isfinite(top)):
        raise ValueError("none of the grade tokens is among the candidates")
    e = np.exp(z - top)
    probs: NDArray[np.float64] = e / e.sum(axis=-1, keepdims=True)
    return probs


__all__ = [
    "DEFAULT_GRADE_TOKENS",
    "DEFAULT_PROMPT",
    "PromptTemplate",
    "check_grade_tokens",
    "grade_logprobs_from_top",
    "grade_probabilities",
    "normalize_token",
]
