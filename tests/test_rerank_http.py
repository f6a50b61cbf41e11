"""The rerank endpoints with real clients over loopback: the cohere SDK (v1 and v2), LangChain's
CohereRerank and text-embeddings-inference's /rerank, configured only with a base URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uvicorn_thread import serve_in_thread

from darl_lite import Scorer, SessionConfig

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
cohere = pytest.importorskip("cohere")

from darl_lite.serve import create_app  # noqa: E402
from darl_lite.serve_schema import CohereRerankResponse, TEIRank  # noqa: E402

TOKEN = "rerank-test-token"
QUERY = "Szechwan cuisine"
DOCS = ["Afghan cuisine", "Mapo doufu", "Kung Pao chicken", "Jazz", "Sichuan pepper"]
MAX_ITEMS = 8
MAX_BODY = 4000


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    return Scorer.load(tiny_bundle_dir, precision="fp32", session=SessionConfig(intra_op_threads=1))


@pytest.fixture(scope="module")
def url(scorer: Scorer) -> Iterator[str]:
    app = create_app(scorer, max_items=MAX_ITEMS, max_body_bytes=MAX_BODY, token=TOKEN)
    yield from serve_in_thread(app)


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[Any]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def _expected(scorer: Scorer, top_k: int | None = None) -> list[tuple[int, float]]:
    return [(r.index, r.relevance_score) for r in scorer.rank(QUERY, DOCS, top_k=top_k)]


def test_cohere_sdk_v2_reranks_through_the_server(url: str, scorer: Scorer) -> None:
    co = cohere.ClientV2(api_key=TOKEN, base_url=url, timeout=30)
    response = co.rerank(model="darl-lite", query=QUERY, documents=DOCS, top_n=3)
    got = [(r.index, r.relevance_score) for r in response.results]
    assert got == _expected(scorer, top_k=3)  # JSON floats round-trip exactly
    assert response.id and response.meta.api_version.version == "2"
    everything = co.rerank(model="darl-lite", query=QUERY, documents=DOCS)
    assert [r.index for r in everything.results] == [i for i, _ in _expected(scorer)]


def test_cohere_sdk_v1_with_document_objects_and_return_documents(url: str, scorer: Scorer) -> None:
    co = cohere.Client(api_key=TOKEN, base_url=url, timeout=30)
    response = co.rerank(
        model="darl-lite", query=QUERY, documents=[{"text": d} for d in DOCS], top_n=2, return_documents=True
    )
    assert [(r.index, r.relevance_score) for r in response.results] == _expected(scorer, 2)
    assert [r.document.text for r in response.results] == [DOCS[r.index] for r in response.results]


def test_langchain_cohere_rerank_with_only_a_base_url(url: str, scorer: Scorer) -> None:
    pytest.importorskip("langchain_cohere")
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(base_url=url, cohere_api_key=TOKEN, model="darl-lite", top_n=2)  # type: ignore[arg-type]
    docs = [Document(page_content=d, metadata={"id": i}) for i, d in enumerate(DOCS)]
    kept = reranker.compress_documents(docs, QUERY)
    expected = _expected(scorer, top_k=2)
    assert [d.metadata["id"] for d in kept] == [i for i, _ in expected]
    assert [d.metadata["relevance_score"] for d in kept] == [s for _, s in expected]


def test_tei_rerank_gives_a_bare_sorted_array(client: Any, scorer: Scorer) -> None:
    body = {"query": QUERY, "texts": DOCS, "return_text": True, "truncate": True}
    response = client.post("/rerank", json=body)
    assert response.status_code == 200, response.text
    rows = response.json()
    assert isinstance(rows, list)
    ranks = [TEIRank.model_validate(r) for r in rows]
    assert [(r.index, r.score) for r in ranks] == _expected(scorer)
    assert [r.text for r in ranks] == [DOCS[r.index] for r in ranks]
    raw = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    by_index = {r.index: r for r in scorer.rank(QUERY, DOCS)}
    assert [r["score"] for r in raw] == pytest.approx([by_index[r["index"]].expected_relevance for r in raw])
    assert all(set(r) == {"index", "score"} for r in raw)  # no text unless asked


def test_cohere_results_carry_only_cohere_fields_and_extras_are_opt_in(client: Any, scorer: Scorer) -> None:
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        plain = client.post(path, json={"query": QUERY, "documents": DOCS}).json()
        CohereRerankResponse.model_validate(plain)
        assert next(iter(plain)) == "results" and "darl_lite" not in plain
        assert all(set(r) == {"index", "relevance_score"} for r in plain["results"])
        assert all(0.0 <= r["relevance_score"] <= 1.0 for r in plain["results"])
    body = {"query": QUERY, "documents": DOCS, "darl_lite": True, "return_documents": True, "top_n": 3}
    rich = client.post("/v2/rerank", json=body).json()
    assert all(set(r) == {"index", "relevance_score", "document"} for r in rich["results"])
    details = rich["darl_lite"]
    assert [d["index"] for d in details] == [r["index"] for r in rich["results"]]
    truth = scorer.score(QUERY, DOCS)
    for d in details:
        assert d["grade"] == truth[d["index"]].grade
        assert d["grade_name"] == scorer.grade_names[d["grade"]]
        assert d["probabilities"] == pytest.approx(truth[d["index"]].probabilities)
        assert d["ood_score"] == pytest.approx(truth[d["index"]].ood_score)
        assert {"routed", "source", "note", "truncated"} <= set(d)


def test_unknown_fields_are_ignored(client: Any) -> None:
    body = {
        "query": QUERY,
        "documents": DOCS,
        "max_tokens_per_doc": 512,
        "rank_fields": ["x"],
        "future": {"a": 1},
    }
    assert client.post("/v2/rerank", json=body).status_code == 200
    tei = {"query": QUERY, "texts": DOCS, "truncation_direction": "Left", "something_new": True}
    assert client.post("/rerank", json=tei).status_code == 200


def test_auth_on_every_rerank_route(url: str) -> None:
    for path, body in (
        ("/v1/rerank", {"query": "q", "documents": ["a"]}),
        ("/v2/rerank", {"query": "q", "documents": ["a"]}),
        ("/rerank", {"query": "q", "texts": ["a"]}),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(f"{url}{path}", json=body, headers=headers)
            assert response.status_code == 401, path
            assert response.json() == {"detail": "missing or wrong bearer token"}
    with pytest.raises(cohere.core.api_error.ApiError) as info:
        cohere.ClientV2(api_key="wrong", base_url=url).rerank(model="m", query="q", documents=["a"])
    assert info.value.status_code == 401


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_limits_on_the_rerank_routes(client: Any, path: str) -> None:
    too_many = client.post(path, json={"query": "q", "documents": ["a"] * (MAX_ITEMS + 1)})
    assert too_many.status_code == 422 and f"limit of {MAX_ITEMS}" in too_many.json()["detail"]
    assert client.post(path, json={"query": "q", "documents": ["a"] * MAX_ITEMS}).status_code == 200
    big = client.post(path, json={"query": "q", "documents": ["x" * (MAX_BODY + 10)]})
    assert big.status_code == 413 and f"{MAX_BODY} bytes" in big.json()["detail"]
    chunked = client.post(path, content=iter([b'{"query": "q", "documents": ["', b"y" * MAX_BODY, b'"]}']))
    assert chunked.status_code == 413
    if path == "/rerank":
        tei = client.post(path, json={"query": "q", "texts": ["a"] * (MAX_ITEMS + 1)})
        assert tei.status_code == 422 and f"limit of {MAX_ITEMS}" in tei.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v2/rerank", {"documents": ["a"]}, "missing field 'query'"),
        ("/v2/rerank", {"query": "q"}, "missing field 'documents'"),
        ("/v2/rerank", {"query": " ", "documents": ["a"]}, "query: is empty or whitespace only"),
        ("/v2/rerank", {"query": "q", "documents": ["a", ""]}, "documents[1]: is empty or whitespace only"),
        ("/v2/rerank", {"query": "q", "documents": ["a", 5]}, "documents[1]: Input should be a valid string"),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"txt": "a"}]},
            "documents[0]: must be a string or an object",
        ),
        ("/v2/rerank", {"query": "q", "documents": "a"}, "documents: Input should be a valid list, got str"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n: Input should be greater than"),
        ("/v2/rerank", [1, 2], "request body"),
        ("/rerank", {"query": "q", "texts": ["a", None]}, "texts[1]: Input should be a valid string"),
        ("/rerank", {"query": "q"}, 'missing field "documents" (Cohere/Jina) or "texts"'),
        ("/rerank", {"query": "q", "texts": ["a"], "documents": ["a"]}, "not both"),
        ("/rerank", b"not json", "not valid JSON"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: Any, path: str, body: Any, message: str) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail


def test_empty_document_lists(client: Any) -> None:
    empty = client.post("/v2/rerank", json={"query": "q", "documents": []}).json()
    assert empty["results"] == []
    assert client.post("/rerank", json={"query": "q", "texts": []}).json() == []


def test_vllm_score_api_one_query_against_many(client: Any, scorer: Scorer) -> None:
    """vLLM's score API, as its clients post it (``/v1/score`` and ``/score`` with ``text_1``):
    one score per pair in input order, the rerank endpoints' relevance score."""
    expected = {r.index: r.relevance_score for r in scorer.rank(QUERY, DOCS)}
    for path, text_1 in (("/v1/score", QUERY), ("/score", QUERY), ("/v1/score", [QUERY])):
        body = {"model": "darl-lite", "text_1": text_1, "text_2": DOCS, "truncate_prompt_tokens": 64}
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "list" and answer["model"] == "darl-lite" and answer["id"]
        assert [d["index"] for d in answer["data"]] == list(range(len(DOCS)))
        assert all(d["object"] == "score" for d in answer["data"])
        assert [d["score"] for d in answer["data"]] == pytest.approx([expected[i] for i in range(len(DOCS))])
        assert set(answer["usage"]) == {"prompt_tokens", "total_tokens"}


def test_vllm_score_api_pair_by_pair_and_its_refusals(client: Any, url: str, scorer: Scorer) -> None:
    """Lists of equal length pair position by position (each pair scored with its own query);
    lengths that do not pair, an empty text or no token are refused with the field named."""
    queries = [QUERY, "jazz musicians", QUERY]
    items = [DOCS[1], DOCS[3], DOCS[0]]
    answer = client.post("/v1/score", json={"text_1": queries, "text_2": items}).json()
    alone = [scorer.rank(q, [t])[0].relevance_score for q, t in zip(queries, items, strict=True)]
    assert [d["score"] for d in answer["data"]] == pytest.approx(alone)
    for body, message in (
        ({"text_1": [QUERY, "x"], "text_2": DOCS}, "text_1 has 2 texts and text_2 5"),
        ({"text_1": QUERY, "text_2": ["a", " "]}, "text_2"),
        ({"text_1": QUERY}, "missing field 'text_2'"),
        ({"text_1": QUERY, "text_2": ["a"] * (MAX_ITEMS + 1)}, "items"),
    ):
        response = client.post("/v1/score", json=body)
        assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert httpx.post(f"{url}/v1/score", json={"text_1": QUERY, "text_2": DOCS}).status_code == 401
