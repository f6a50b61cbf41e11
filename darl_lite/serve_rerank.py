"""Rerank responses in the shapes other rerankers' clients parse: Cohere/Jina and text-embeddings-inference.

* Cohere / Jina (``/v1/rerank``, ``/v2/rerank``, ``/rerank`` with ``documents``):
  ``{"results": [{"index", "relevance_score", "document"?: {"text"}}], "id", "meta"}``, best first.
  ``relevance_score`` is the calibrated expected relevance divided by the largest grade gain, in
  [0, 1]. darl-lite's details (grade, probabilities, OOD score, routed, note) appear only when the
  request asks (``"darl_lite": true``), under a top-level ``"darl_lite"`` key, never inside
  ``results`` (Elasticsearch's parsers reject unknown fields there).
* text-embeddings-inference (``/rerank`` with ``texts``): a bare array ``[{"index", "score",
  "text"?}]``, best first; ``raw_scores: true`` gives the expected relevance in grade-gain units.

Imported only when an app is built (pydantic comes with the ``serve`` extra).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from darl_lite.errors import InputError
from darl_lite.ranking import rank_results
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


__all__ = ["cohere_response", "rerank_form", "tei_response"]
