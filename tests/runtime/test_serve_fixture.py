"""`serve`'s POST /score and GET /healthz over real HTTP on loopback, from the committed bundle."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from darl_lite import Scorer
from darl_lite.serve import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for uvicorn_thread
from uvicorn_thread import serve_in_thread

ITEMS = ["szechwan dish", "football club", "planet star"]


@pytest.fixture(scope="module")
def client(fixture_scorer: Scorer) -> Iterator[Any]:
    for url in serve_in_thread(create_app(fixture_scorer, max_items=10, token="t0ken")):
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t0ken"}, timeout=30) as c:
            yield c


def test_score_equals_the_scorer(client: Any, fixture_scorer: Scorer) -> None:
    response = client.post("/score", json={"query": "szechwan food", "items": ITEMS})
    assert response.status_code == 200, response.text
    expected = [asdict(r) for r in fixture_scorer.score("szechwan food", ITEMS)]
    got = [{**r, "probabilities": tuple(r["probabilities"])} for r in response.json()["results"]]
    assert got == expected


def test_bad_input_and_limits(client: Any) -> None:
    empty = client.post("/score", json={"query": " ", "items": ITEMS})
    assert empty.status_code == 422 and "query" in empty.text
    too_many = client.post("/score", json={"query": "q", "items": ["x"] * 11})
    assert too_many.status_code in (413, 422)
    assert httpx.post(str(client.base_url) + "/score", json={"query": "q", "items": ["x"]}).status_code == 401


def test_healthz_is_open_and_ready(client: Any) -> None:
    response = httpx.get(str(client.base_url) + "/healthz", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"
