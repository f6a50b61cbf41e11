"""LLM fallbacks for the scorer: grade pairs with a full LLM when the student is unsure.

:class:`ClassifyGradeClient` talks to a classification server in vLLM's ``/classify`` protocol:
the tuned teacher (``darl-lite distill serve-teacher``) or vLLM itself. :class:`OpenAIGradeClient`
talks to any OpenAI-compatible completions server (vLLM, llama.cpp's server, TGI) and reads grades
from token logprobs. :func:`fallback_from_url` builds either; both share the transport rules of
:mod:`darl_lite.llm.transport` and report ``health()``. They need the ``llm`` extra (httpx), which is
imported only when a client is built: importing this package costs nothing beyond the runtime.
A local Hugging Face model grades the same way in process with
:class:`darl_lite.distill.local_llm.LocalLLMGrader` (the ``distill`` extra), and
:mod:`darl_lite.distill.openai_server` serves one over HTTP.
"""

from darl_lite.llm.adapters import teacher_fallback
from darl_lite.llm.breaker import BreakerState, CircuitBreaker
from darl_lite.llm.classify_client import ClassifyGradeClient
from darl_lite.llm.errors import CircuitOpenError, FallbackError
from darl_lite.llm.factory import PROTOCOLS, GradeClient, fallback_from_url
from darl_lite.llm.openai_client import OpenAIGradeClient
from darl_lite.llm.pair_text import TEACHER_TEMPLATE, PairText
from darl_lite.llm.prompt import (
    DEFAULT_GRADE_TOKENS,
    DEFAULT_PROMPT,
    PromptTemplate,
    grade_logprobs_from_top,
    grade_probabilities,
    normalize_token,
)

__all__ = [
    "DEFAULT_GRADE_TOKENS",
    "DEFAULT_PROMPT",
    "PROTOCOLS",
    "TEACHER_TEMPLATE",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClassifyGradeClient",
    "FallbackError",
    "GradeClient",
    "OpenAIGradeClient",
    "PairText",
    "PromptTemplate",
    "fallback_from_url",
    "grade_logprobs_from_top",
    "grade_probabilities",
    "normalize_token",
    "teacher_fallback",
]
