"""Rerank and score responses in the shapes other services' clients parse: Cohere/Jina,
text-embeddings-inference and vLLM's score API.

* Cohere / Jina (``/v1/rerank``, ``/v2/rerank``, ``/rerank`` with ``documents``):
  ``{"results": [{"index", "relevance_score", "document"?: {"text"}}], "id", "meta"}``, best first.
  ``relevance_score`` is the calibrated expected relevance divided by the largest grade gain, in
  [0, 1]. darl-lite's details (grade, probabilities, OOD score, routed, note) appear only when the
  request asks (``"darl_lite": true``), under a top-level ``"darl_lite"`` key, never inside
  ``results`` (Elasticsearch's parsers reject unknown fields there).
* text-embeddings-inference (``/rerank`` with ``texts``): a bare array ``[{"index", "score",
  "text"?}]``, best first; ``raw_scores: true`` gives the expected relevance in grade-gain units.
* vLLM's score API (``/v1/score``, and ``/score`` with ``text_1``): ``{"id", "object": "list",
  "created", "model", "data": [{"index", "object": "score", "score"}], "usage"}``, input order,
  ``score`` as ``relevance_score``.

Imported only when an app is built (pydantic comes with the ``serve`` extra).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from darl_lite.errors import InputError
from darl_lite.ranking import rank_results, relevance_scale, relevance_score
from darl_lite.scorer import PairScore
from darl_lite.serve_schema import (
    ApiVersion,
    CohereRerankRequest,
    CohereRerankResponse,
    DarlLiteDetail,
    RerankDocument,
    RerankMeta,
    RerankResult,
    TEIRank,
    TEIRerankRequest,
    VLLMScoreData,
    VLLMScoreRequest,
    VLLMScoreResponse,
    VLLMUsage,
)


def cohere_response(
    body: CohereRerankRequest,
    results: Sequence[PairScore],
    *,
    gains: Sequence[float],
    grade_names: Sequence[str],
    api_version: str,
) -> CohereRerankResponse:
    """The Cohere/Jina response for ``results`` (one per document, input order)."""
    ranked = rank_results(results, body.documents, gains=gains, top_k=body.top_n, return_items=True)
    rows = [
        RerankResult(
            index=r.index,
            relevance_score=r.relevance_score,
            document=RerankDocument(text=r.item) if body.return_documents and r.item is not None else None,
        )
        for r in ranked
    ]
    details = None
    if body.darl_lite:
        details = [
            DarlLiteDetail(
                index=r.index,
                grade=r.score.grade,
                grade_name=grade_names[r.score.grade],
                expected_relevance=r.score.expected_relevance,
                probabilities=list(r.score.probabilities),
                ood_score=r.score.ood_score,
                ood_percentile=r.score.ood_percentile,
                query_shift=r.score.query_shift,
                routed=r.score.routed,
                source=r.score.source,
                truncated=r.score.truncated,
                note=r.score.note,
            )
            for r in ranked
        ]
    return CohereRerankResponse(
        results=rows,
        id=str(uuid.uuid4()),
        meta=RerankMeta(api_version=ApiVersion(version=api_version)),
        darl_lite=details,
    )


def tei_response(
    body: TEIRerankRequest, results: Sequence[PairScore], *, gains: Sequence[float]
) -> list[TEIRank]:
    """The text-embeddings-inference response for ``results`` (one per text, input order)."""
    ranked = rank_results(results, body.texts, gains=gains, return_items=body.return_text)
    return [
        TEIRank(
            index=r.index,
            score=r.score.expected_relevance if body.raw_scores else r.relevance_score,
            text=r.item,
        )
        for r in ranked
    ]


def vllm_pairs(body: VLLMScoreRequest) -> list[tuple[str, list[str]]]:
    """The pairs of a vLLM score request as ``(query, items)`` requests, in input order: one
    ``text_1`` (a string or a one-element list) against every ``text_2``, or lists of equal length
    paired position by position (vLLM's own rules)."""
    first = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
    second = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
    if not first or not second:
        raise InputError("text_1 and text_2 must each hold at least one text")
    if len(first) == 1:
        return [(first[0], second)]
    if len(first) != len(second):
        raise InputError(
            f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or as many as text_2"
        )
    requests: list[tuple[str, list[str]]] = []
    for query, item in zip(first, second, strict=True):  # runs of one query become one request
        if requests and requests[-1][0] == query:
            requests[-1][1].append(item)
        else:
            requests.append((query, [item]))
    return requests


def vllm_score_response(
    results: Sequence[PairScore], *, gains: Sequence[float], model: str
) -> VLLMScoreResponse:
    """vLLM's score response for ``results`` (one per pair, input order); the score is the
    expected relevance divided by the largest grade gain, as the rerank endpoints' ``relevance_score``."""
    scale = relevance_scale(gains)
    return VLLMScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        data=[
            VLLMScoreData(index=i, score=relevance_score(r.expected_relevance, scale))
            for i, r in enumerate(results)
        ],
        usage=VLLMUsage(),
    )


def rerank_form(body: object) -> str:
    """Which API a ``/rerank`` body speaks: ``"tei"`` (has ``texts``) or ``"cohere"`` (``documents``)."""
    if not isinstance(body, dict):
        raise InputError('request body must be a JSON object: {"query", "documents"} or {"query", "texts"}')
    has_texts, has_documents = "texts" in body, "documents" in body
    if has_texts and has_documents:
        raise InputError(
            'give either "documents" (Cohere/Jina) or "texts" (text-embeddings-inference), not both'
        )
    if has_texts:
        return "tei"
    if has_documents:
        return "cohere"
    raise InputError('missing field "documents" (Cohere/Jina) or "texts" (text-embeddings-inference)')


__all__ = ["cohere_response", "rerank_form", "tei_response", "vllm_pairs", "vllm_score_response"]
