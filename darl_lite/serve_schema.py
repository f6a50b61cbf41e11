"""The typed HTTP schema of ``darl-lite serve``: pydantic request and response models.

The OpenAPI document at ``/openapi.json`` is generated from these models, so clients can be generated
and the API fuzzed from its own description. Bodies are read by the server itself (size cap while
streaming, then JSON), then validated here: ``/score`` keeps its hand-checked rules and messages
(see :func:`darl_lite.serve.parse_score_body`), the rerank bodies are validated by these models.

Rerank requests ignore unknown fields, as the services whose clients they serve do (Cohere, Jina,
text-embeddings-inference); ``/score`` rejects them. Imported only when an app is built: pydantic
comes with the ``serve`` extra.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

# --------------------------------------------------------------------------------------------------
# Shared


class ErrorResponse(BaseModel):
    """Every error: 401 (token), 413 (body size), 422 (bad input, naming the field), 500."""

    detail: str


def _not_blank(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty or whitespace only; give it some text")
    return value


Text = Annotated[str, BeforeValidator(_not_blank)]


# --------------------------------------------------------------------------------------------------
# /score


class ScoreQuery(BaseModel):
    """One query and the items to grade against it."""

    model_config = ConfigDict(extra="forbid")
    query: str
    items: list[str]


class ScoreBatchRequest(BaseModel):
    """Many queries in one request; results come back in one list per query."""

    model_config = ConfigDict(extra="forbid")
    requests: list[ScoreQuery]


class PairScoreOut(BaseModel):
    """The grade of one pair (the fields of :class:`darl_lite.PairScore`; a test keeps them equal)."""

    probabilities: list[float] = Field(description="one per grade, in the bundle's grade order")
    expected_relevance: float = Field(description="sum of probability × gain")
    grade: int = Field(description="the most probable grade")
    ood_score: float = Field(description="raw OOD score (squared Mahalanobis distance); higher = further out")
    routed: bool = Field(description="the pair was sent to the LLM (or would be, with no fallback)")
    source: Literal["student", "llm"]
    truncated: bool
    note: str = ""
    ood_percentile: float | None = Field(
        None, description="share of in-distribution dev pairs with a lower OOD score; null: not in bundle"
    )
    query_shift: float = Field(
        0.0, description="how much the query looks like a known kind of shifted traffic, in [0, 1]"
    )


class ScoreResponse(BaseModel):
    results: list[PairScoreOut] | list[list[PairScoreOut]] = Field(
        description="one result per item in input order; one list per query for the batch form"
    )


# --------------------------------------------------------------------------------------------------
# Cohere / Jina rerank


class RerankDocumentIn(BaseModel):
    """A document given as an object; only ``text`` is read."""

    model_config = ConfigDict(extra="ignore")
    text: str


def _document_text(value: object) -> object:
    """Documents may be strings or ``{"text": ...}`` objects (Cohere v1, Jina); both become text."""
    if isinstance(value, dict):
        text = value.get("text")
        if not isinstance(text, str):
            raise ValueError('must be a string or an object with a string "text" field')
        value = text
    return _not_blank(value)


Document = Annotated[str, BeforeValidator(_document_text, json_schema_input_type=str | RerankDocumentIn)]


class CohereRerankRequest(BaseModel):
    """Cohere (v1/v2) and Jina rerank request; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    query: Text
    documents: list[Document]
    top_n: int | None = Field(None, ge=1, description="keep the best n (default: all documents)")
    return_documents: bool = False
    model: str | None = Field(None, description="accepted and ignored: the server serves one bundle")
    darl_lite: bool = Field(False, description='true adds darl-lite\'s per-result details under "darl_lite"')


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="position of the document in the request")
    relevance_score: float = Field(description="expected relevance / largest grade gain, in [0, 1]")
    document: RerankDocument | None = Field(None, description="present with return_documents")


class ApiVersion(BaseModel):
    version: str


class RerankMeta(BaseModel):
    api_version: ApiVersion
    warnings: list[str] = Field(default_factory=list)


class DarlLiteDetail(BaseModel):
    """darl-lite's own view of one ranked result (opt-in, request ``"darl_lite": true``)."""

    index: int
    grade: int
    grade_name: str
    expected_relevance: float
    probabilities: list[float]
    ood_score: float
    ood_percentile: float | None = None
    query_shift: float = 0.0
    routed: bool
    source: Literal["student", "llm"]
    truncated: bool
    note: str = ""


class CohereRerankResponse(BaseModel):
    results: list[RerankResult] = Field(description="best first; ties in input order")
    id: str
    meta: RerankMeta
    darl_lite: list[DarlLiteDetail] | None = Field(
        None, description='only when asked for: one entry per result, in the order of "results"'
    )


# --------------------------------------------------------------------------------------------------
# text-embeddings-inference rerank


class TEIRerankRequest(BaseModel):
    """text-embeddings-inference's ``/rerank`` request; unknown fields are ignored.

    ``truncate`` and ``truncation_direction`` are accepted; darl-lite always keeps the first
    ``max_length`` tokens of a pair (as ``truncate: true`` does on the right).
    """

    model_config = ConfigDict(extra="ignore")
    query: Text
    texts: list[Text]
    raw_scores: bool = Field(False, description="true: expected relevance in grade-gain units, not [0, 1]")
    return_text: bool = False
    truncate: bool | None = False
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


# --------------------------------------------------------------------------------------------------
# vLLM's score API (``/v1/score``, and ``/score`` with ``text_1``)


class VLLMScoreRequest(BaseModel):
    """vLLM's score request: ``text_1`` against ``text_2`` (one against many, or pair by pair);
    unknown fields (``truncate_prompt_tokens``, ...) are ignored, as vLLM's clients may send them."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="accepted and ignored: the server serves one bundle")
    text_1: Text | list[Text] = Field(description="the query (or one per pair)")
    text_2: Text | list[Text] = Field(description="the items")


class VLLMScoreData(BaseModel):
    index: int = Field(description="position of the pair in the request")
    object: Literal["score"] = "score"
    score: float = Field(description="expected relevance / largest grade gain, in [0, 1]")


class VLLMUsage(BaseModel):
    prompt_tokens: int = Field(default=0, description="darl-lite does not count tokens: 0")
    total_tokens: int = 0


class VLLMScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[VLLMScoreData] = Field(description="one per pair, in input order")
    usage: VLLMUsage


# --------------------------------------------------------------------------------------------------
# /healthz


class FallbackHealth(BaseModel):
    model_config = ConfigDict(extra="allow")
    configured: bool
    breaker: str | None = None
    calls: int = 0
    failures: int = 0
    last_latency_ms: float | None = None
    p50_latency_ms: float | None = None


class BatchingHealth(BaseModel):
    """Whether concurrent requests share model passes (``--no-batching`` turns it off)."""

    enabled: bool
    max_batch_pairs: int | None = None
    model_workers: int | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]
    bundle_loaded: bool
    precision: str
    format_version: int | None
    grades: list[str]
    fallback: FallbackHealth
    batching: BatchingHealth | None = None


# --------------------------------------------------------------------------------------------------


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a validation error as one line naming the field, e.g.
    ``documents[2]: must be a string ...`` — never echoing the submitted value."""
    first = exc.errors(include_url=False, include_input=True)[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = str(first["msg"]).removeprefix("Value error, ")
    kind = first["type"]
    if kind == "missing":
        return f"missing field {path!r}"
    if kind.endswith("_type") and "input" in first:
        message = f"{message}, got {type(first['input']).__name__}"
    return f"{path or 'request body'}: {message}"


def request_body_schemas(models: dict[str, list[type[BaseModel]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAPI ``requestBody`` objects per path and the component schemas they refer to."""
    from pydantic.json_schema import models_json_schema

    every = sorted({m for group in models.values() for m in group}, key=lambda m: m.__name__)
    refs, defs = models_json_schema(
        [(m, "validation") for m in every], ref_template="#/components/schemas/{model}"
    )
    bodies = {}
    for path, group in models.items():
        schemas = [refs[(m, "validation")] for m in group]
        schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
        bodies[path] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return bodies, defs.get("$defs", {})


def install_openapi(app: Any) -> None:
    """Document the request bodies (read by hand, so FastAPI cannot see them) from the models."""
    from fastapi.openapi.utils import get_openapi

    bodies_by_path: dict[str, list[type[BaseModel]]] = {
        "/score": [ScoreQuery, ScoreBatchRequest, VLLMScoreRequest],
        "/v1/score": [VLLMScoreRequest],
        "/v1/rerank": [CohereRerankRequest],
        "/v2/rerank": [CohereRerankRequest],
        "/rerank": [CohereRerankRequest, TEIRerankRequest],
    }

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            bodies, defs = request_body_schemas(bodies_by_path)
            for path, body in bodies.items():
                doc["paths"][path]["post"]["requestBody"] = body
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            app.openapi_schema = doc
        return dict(app.openapi_schema)

    app.openapi = document


__all__ = [
    "CohereRerankRequest",
    "CohereRerankResponse",
    "DarlLiteDetail",
    "ErrorResponse",
    "HealthResponse",
    "PairScoreOut",
    "RerankResult",
    "ScoreBatchRequest",
    "ScoreQuery",
    "ScoreResponse",
    "TEIRank",
    "TEIRerankRequest",
    "VLLMScoreRequest",
    "VLLMScoreResponse",
    "describe_validation_error",
    "install_openapi",
    "request_body_schemas",
]
