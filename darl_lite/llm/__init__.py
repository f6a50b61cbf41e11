"""LLM fallbacks for the scorer: grade pairs with a full LLM when the student is unsure.

:class:`OpenAIGradeClient` talks to any OpenAI-compatible completions server (vLLM, llama.cpp's
server, TGI) and needs the ``llm`` extra (httpx), which is imported only when a client is built:
importing this package costs nothing beyond the runtime. A local Hugging Face model grades the same
way in process with :class:`darl_lite.distill.local_llm.LocalLLMGrader` (the ``distill`` extra), and
:mod:`darl_lite.distill.openai_server` serves one over HTTP.
"""

from darl_lite.llm.adapters import teacher_fallback
from darl_lite.llm.breaker import BreakerState, CircuitBreaker
from darl_lite.llm.errors import CircuitOpenError, FallbackError
from darl_lite.llm.openai_client import OpenAIGradeClient
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
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "FallbackError",
    "OpenAIGradeClient",
    "PromptTemplate",
    "grade_logprobs_from_top",
    "grade_probabilities",
    "normalize_token",
    "teacher_fallback",
]
