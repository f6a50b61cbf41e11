"""The pieces that now live in one place: the probability-row check, the capped body read, the
clients' shared base, the CLI's secret and scorer helpers, and the length-sorted batches."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from darl_lite.cli_fallback import add_fallback_arguments, scorer_from_args, secret_from_env
from darl_lite.errors import InputError
from darl_lite.http_body import HTTPProblem, read_body
from darl_lite.llm import ClassifyGradeClient, OpenAIGradeClient
from darl_lite.llm.client_base import response_json
from darl_lite.metrics import check_probability_rows


def test_probability_rows_pass_and_name_the_bad_row() -> None:
    check_probability_rows(np.array([[0.2, 0.8], [1.0, 0.0]]), "p")
    with pytest.raises(InputError, match=r"p must be >= 0; row 1 has a negative"):
        check_probability_rows(np.array([[0.5, 0.5], [1.5, -0.5]]), "p")
    with pytest.raises(InputError, match=r"2 rows do not, e.g. row 0 summing to 2"):
        check_probability_rows(np.array([[1.0, 1.0], [0.5, 0.5], [3.0, 0.0]]), "p")
    check_probability_rows(np.array([[0.5, 0.55]]), "p", tol=0.1)  # the tolerance is the caller's


class _Request:
    """What read_body reads of a Starlette request: headers and the streamed body."""

    def __init__(self, chunks: list[bytes], declared: str | None = None) -> None:
        self.headers = {} if declared is None else {"content-length": declared}
        self._chunks = chunks

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def test_read_body_joins_chunks_and_refuses_past_the_cap() -> None:
    assert asyncio.run(read_body(_Request([b"ab", b"cd"]), 4)) == b"abcd"
    with pytest.raises(HTTPProblem, match=r"exceeds the limit of 3 bytes \(--x\)") as streamed:
        asyncio.run(read_body(_Request([b"ab", b"cd"]), 3, " (--x)"))
    assert streamed.value.status == 413
    with pytest.raises(HTTPProblem, match=r"limit of 10 bytes$"):  # declared too big: nothing read
        asyncio.run(read_body(_Request([], declared="11"), 10))


def test_response_json_says_what_came() -> None:
    assert response_json(httpx.Response(200, json={"a": 1})) == {"a": 1}
    with pytest.raises(ValueError, match=r"body is not JSON .*'<html>"):
        response_json(httpx.Response(200, content=b"<html>"))


@pytest.mark.parametrize(
    ("client", "url", "protocol", "endpoint"),
    [
        (OpenAIGradeClient, "http://127.0.0.1:9/v1", "completions", "/v1/completions"),
        (ClassifyGradeClient, "http://127.0.0.1:9", "classify", "/classify"),
    ],
)
def test_both_clients_share_settings_health_and_a_secret_free_repr(
    client: type[OpenAIGradeClient | ClassifyGradeClient], url: str, protocol: str, endpoint: str
) -> None:
    with client(url, "m", api_key="s3cret") as c:
        assert c.base_url == "http://127.0.0.1:9" and c.endpoint == "http://127.0.0.1:9" + endpoint
        health = c.health()
        assert health["protocol"] == protocol and health["model"] == "m" and health["calls"] == 0
        assert c.retries == c.transport.retries and c.timeout_s == c.transport.timeout_s
        assert "s3cret" not in repr(c) and "api_key=<set>" in repr(c)


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert secret_from_env("--token-env", None, "fix it") is None
    monkeypatch.setenv("DARL_T", "tok")
    assert secret_from_env("--token-env", "DARL_T", "fix it") == "tok"
    monkeypatch.setenv("DARL_T", "  ")
    with pytest.raises(InputError, match="--token-env DARL_T: that environment variable is unset or empty"):
        secret_from_env("--token-env", "DARL_T", "fix it")


#: The committed bundle fixture (tests/fixtures/make_tiny_bundle.py): no torch needed to score with it.
TINY_BUNDLE = Path(__file__).resolve().parent / "fixtures" / "tiny_bundle"


def test_scorer_from_args_loads_the_bundle_and_closes_the_fallback() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--threads", type=int, default=1)
    add_fallback_arguments(parser)
    argv = [str(TINY_BUNDLE), "--fallback-url", "http://127.0.0.1:9", "--route-budget", "0.5"]
    args = parser.parse_args(argv)
    with scorer_from_args(args) as scorer:
        assert scorer.budget is not None and scorer.fallback is not None
        client = scorer.fallback
        assert isinstance(client, OpenAIGradeClient | ClassifyGradeClient)
        assert len(scorer.score("szechwan cuisine", ["Mapo doufu"])) == 1
        assert not client.transport._closing.is_set()
    assert client.transport._closing.is_set()  # closed on leaving the block


def test_length_sorted_batches_are_shortest_first_and_stable() -> None:
    from darl_lite.distill.backbone import length_sorted_batches

    assert length_sorted_batches([3, 1, 2, 1], 2) == [[1, 3], [2, 0]]
    assert length_sorted_batches([], 4) == []
