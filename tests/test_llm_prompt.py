"""Pure pieces of the LLM fallback, checked against values worked out by hand: token matching,
the grade softmax, prompt templates, and the circuit breaker's state machine on a fake clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darl_lite.errors import InputError
from darl_lite.llm import (
    CircuitBreaker,
    CircuitOpenError,
    PromptTemplate,
    grade_logprobs_from_top,
    grade_probabilities,
    normalize_token,
)


def test_token_variants_normalise_to_the_grade() -> None:
    assert [normalize_token(t) for t in ("1", " 1", "▁1", "Ġ1", "1\n", "Ċ1")] == ["1"] * 6
    assert normalize_token(" weak ") == "weak"


def test_grade_logprobs_combine_variants_and_ignore_other_tokens() -> None:
    top = {" 0": math.log(0.1), "0": math.log(0.2), "▁2": math.log(0.3), "x": math.log(0.4)}
    lp = grade_logprobs_from_top(top, ("0", "1", "2"))
    np.testing.assert_allclose(np.exp(lp), [0.3, 0.0, 0.3], atol=1e-12)
    np.testing.assert_allclose(grade_probabilities(lp), [0.5, 0.0, 0.5], atol=1e-12)


def test_grade_probabilities_refuse_rows_without_a_grade_token_or_with_nan() -> None:
    with pytest.raises(ValueError, match="none of the grade tokens"):
        grade_probabilities(grade_logprobs_from_top({"x": -0.1}, ("0", "1")))
    with pytest.raises(ValueError, match="finite"):
        grade_logprobs_from_top({"0": float("nan")}, ("0", "1"))
    with pytest.raises(ValueError, match="must be a number"):
        grade_logprobs_from_top({"0": "-1.0"}, ("0", "1"))  # type: ignore[dict-item]
    np.testing.assert_allclose(grade_probabilities(np.array([[0.0, -np.inf]])), [[1.0, 0.0]])


def test_prompt_template_renders_and_rejects_bad_templates() -> None:
    template = PromptTemplate("Q: {query} | I: {item} | {{json}} | Grade:", max_field_chars=3)
    assert template.render("query", "{item}") == "Q: que | I: {it | {json} | Grade:"
    for bad in ("{query} only", "{query} {item} {extra}", "{query} {item} {"):
        with pytest.raises(InputError):
            PromptTemplate(bad)
    with pytest.raises(InputError, match="max_field_chars"):
        PromptTemplate(max_field_chars=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=10.0, clock=clock)
    assert breaker.acquire() is False and breaker.state == "closed"
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for reason in ("c", "d", "e"):
        assert breaker.allows()
        breaker.record_failure(reason)
    assert breaker.state == "open" and not breaker.allows()
    with pytest.raises(CircuitOpenError, match=r"3 consecutive failures \(last: e\); next probe in 10.00 s"):
        breaker.acquire()
    breaker.record_success()  # a stale success from a request sent before it opened changes nothing
    assert breaker.state == "open"

    clock.now += 10.0
    assert breaker.state == "half_open"
    assert breaker.acquire() is True  # the probe
    assert breaker.allows(probe=True) and not breaker.allows()
    with pytest.raises(CircuitOpenError, match="a probe is in flight"):
        breaker.acquire()
    clock.now += 10.0  # a probe that never reports is replaced
    assert breaker.acquire() is True
    breaker.record_failure("probe failed")  # a failed probe reopens at once
    assert breaker.state == "open"

    clock.now += 10.0
    assert breaker.acquire() is True
    breaker.release_probe()  # the probe's call was abandoned before it was sent
    assert breaker.acquire() is True
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    assert "closed" in repr(breaker)


def test_breaker_rejects_bad_settings() -> None:
    for kwargs in ({"failure_threshold": 0}, {"failure_threshold": True}, {"reset_timeout_s": 0}):
        with pytest.raises(InputError):
            CircuitBreaker(**kwargs)
