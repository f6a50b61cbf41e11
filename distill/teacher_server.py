"""Serve the tuned teacher over HTTP in vLLM's classification protocol (``darl-lite distill serve-teacher``).

Any teacher object with ``predict_proba(pairs) -> (n, n_grades)`` (the stage-1
:class:`~darl_lite.distill.teacher_tune.ProbeTeacher`, or a later stage's loader) is served as:

* ``POST /classify`` (and ``/v1/classify``): vLLM's ``ClassificationRequest`` — ``{"model"?,
  "input": str | [str, ...]}`` — answered with a ``ClassificationResponse``: ``data[i] = {"index",
  "label", "probs", "num_classes"}`` and ``usage``. Each input is a pair rendered with the teacher's
  template (:data:`darl_lite.llm.TEACHER_TEMPLATE`); the server splits it back into its pair
  (:class:`darl_lite.llm.PairText`; the split re-renders to the very same text), so the
  probabilities are the in-process ``predict_proba``'s.
* ``GET /health`` and ``GET /v1/models`` (the served name and the teacher's max length).

Why not vLLM itself: the stage-1 head is not a standard ``Qwen2ForSequenceClassification`` folder.
That class (transformers ``GenericForSequenceClassification``) reads the *last* layer's output
after the final RMSNorm through ``nn.Linear(hidden, num_labels, bias=False)``; the probe reads the
un-normed ``hidden_states[18]``, standardised, through a layer *with* a bias. Truncating the model
to 18 blocks brings the right layer and a crafted extra block can add a constant (its value bias)
for the bias, but the final RMSNorm divides each pair's state by its own RMS, a per-pair scale no
linear head undoes; making that norm linear with a huge ``rms_norm_eps`` is impossible without
changing the other blocks, since every RMSNorm of the model shares that one config value. So vLLM
cannot serve it unchanged; this server speaks vLLM's protocol instead, and a teacher that is a
standard classification folder can be served by vLLM with the same client
(``darl_lite.llm.ClassifyGradeClient``).

Bounded: at most ``max_batch`` inputs of at most ``max_text_chars`` characters per request, the
body capped while it streams in; forward passes are serialised (one model, one lock). Errors are
``{"error": {"message", "type", "code"}}``: 400 for bad input, 404 for another model name, 413 for
an oversized body, 500 when the teacher fails. FastAPI and uvicorn come with the ``serve`` extra.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime.
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.http_body import HTTPProblem, read_body
from darl_lite.llm.pair_text import TEACHER_TEMPLATE, PairText
from darl_lite.types import GRADE_NAMES, Pair

logger = logging.getLogger(__name__)

#: Inputs per request, characters per input and bytes per body, by default.
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_TEXT_CHARS = 20_000
DEFAULT_MAX_BODY_BYTES = 4_000_000
DEFAULT_MODEL_NAME = "darl-lite-teacher"
#: Lone UTF-16 surrogates cannot reach a Rust tokenizer (the runtime's pair_tokens does the same).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def shipped_head_path() -> Path:
    """The head of the shipped teacher (``darl_lite/data/teacher_llm_head.npz``)."""
    return Path(str(resources.files("darl_lite") / "data" / "teacher_llm_head.npz"))


class TeacherEngine:
    """The HTTP-free core: a classification request body in, a response body out (thread-safe)."""

    def __init__(
        self,
        teacher: Any,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        template: str | None = None,
        grade_names: Sequence[str] = GRADE_NAMES,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if not callable(getattr(teacher, "predict_proba", None)):
            raise InputError(f"the teacher must have predict_proba(pairs); got {type(teacher).__name__}")
        if max_batch < 1 or max_text_chars < 1:
            raise InputError(f"max_batch and max_text_chars must be >= 1; got {max_batch}, {max_text_chars}")
        self.teacher = teacher
        self.model_name = model_name
        self.text = PairText(template or getattr(teacher, "template", None) or TEACHER_TEMPLATE)
        self.grade_names = tuple(grade_names)
        self.max_batch = max_batch
        self.max_text_chars = max_text_chars
        self.created = int(time.time())
        self._lock = threading.Lock()

    def models(self) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "darl-lite",
            "template": self.text.template,
        }
        max_length = _max_length(self.teacher)
        if max_length is not None:
            card["max_model_len"] = max_length
        return {"object": "list", "data": [card]}

    def pairs_of(self, body: object) -> list[Pair]:
        """The request's inputs split into pairs; :class:`HTTPProblem` naming what is wrong."""
        if not isinstance(body, dict):
            raise HTTPProblem(400, "the request body must be a JSON object with an 'input' field")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise HTTPProblem(
                404, f"the model {model!r} does not exist; GET /v1/models lists {self.model_name!r}"
            )
        if body.get("truncate_prompt_tokens") is not None:
            raise HTTPProblem(
                400, "truncate_prompt_tokens is not supported: the teacher truncates to its max length"
            )
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts:
            raise HTTPProblem(400, "'input' must be a non-empty string or a non-empty list of strings")
        if len(texts) > self.max_batch:
            raise HTTPProblem(
                413, f"{len(texts)} inputs in one request exceeds the limit of {self.max_batch} (--max-batch)"
            )
        pairs = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise HTTPProblem(400, f"input[{i}] must be a string; got {type(text).__name__}")
            if len(text) > self.max_text_chars:
                raise HTTPProblem(
                    413, f"input[{i}] has {len(text)} characters; the limit is {self.max_text_chars}"
                )
            text = _replace_lone_surrogates(text)
            try:
                query, item = self.text.split(text)
            except ValueError as exc:
                raise HTTPProblem(
                    400,
                    f"input[{i}] {exc}: render each pair with darl_lite.llm.PairText({self.text.template!r})",
                ) from exc
            pairs.append(Pair(query, item))
        return pairs

    def classify(self, body: object) -> dict[str, Any]:
        pairs = self.pairs_of(body)
        with self._lock:
            probs = np.asarray(self.teacher.predict_proba(pairs), np.float32)
            tokens = self._count_tokens(pairs)
        if probs.shape != (len(pairs), len(self.grade_names)) or not np.isfinite(probs).all():
            raise HTTPProblem(500, f"the teacher returned shape {probs.shape} or non-finite values")
        data = [
            {
                "index": i,
                "label": self.grade_names[int(np.argmax(row))],
                "probs": [float(p) for p in row],
                "num_classes": len(row),
            }
            for i, row in enumerate(probs)
        ]
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": self.model_name,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }

    def _count_tokens(self, pairs: Sequence[Pair]) -> int:
        """Prompt tokens the teacher read (0 when it exposes no tokenizer)."""
        tokenizer = getattr(self.teacher, "tokenizer", None)
        max_length = _max_length(self.teacher)
        if tokenizer is None:
            return 0
        texts = [self.text.render(p.query, p.item) for p in pairs]
        encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
        return int(sum(len(ids) for ids in encoded["input_ids"]))


def _max_length(teacher: Any) -> int | None:
    """The tokens per text the teacher reads (stage 1: ``max_length``; stages 2-3: its settings)."""
    value = getattr(teacher, "max_length", None)
    if value is None:
        value = (getattr(teacher, "settings", None) or {}).get("max_length")
    return int(value) if isinstance(value, (int, np.integer)) else None


def _replace_lone_surrogates(text: str) -> str:
    """U+FFFD for lone UTF-16 surrogates (from a bad decode), as the runtime scores them."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError as exc:
        raise MissingExtraError.for_module("fastapi", "serve") from exc
    return fastapi


def create_app(engine: TeacherEngine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """A FastAPI app serving ``engine`` (routes in the module docstring)."""
    fastapi = _import_fastapi()
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = fastapi.FastAPI(title="darl-lite teacher", version="1", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> Any:
        kind = "BadRequestError" if status < 500 else "InternalServerError"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    async def classify(request: Request) -> Any:
        try:
            raw = await read_body(request, max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise HTTPProblem(400, f"the request body is not JSON: {exc}") from exc
            return await run_in_threadpool(engine.classify, body)
        except HTTPProblem as exc:
            return error(exc.status, str(exc))
        except Exception as exc:  # the teacher failed: answer 500 (retryable), keep serving
            logger.exception("classification failed")
            return error(500, f"{type(exc).__name__}: {exc}")

    for path in ("/classify", "/v1/classify"):
        app.add_api_route(path, classify, methods=["POST"], summary="vLLM classification API")

    async def health() -> Any:
        return {"status": "ok", "model": engine.model_name}

    async def models() -> Any:
        return engine.models()

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    return app


def load_probe_teacher(
    model_dir: str | os.PathLike[str] | None = None, head: str | os.PathLike[str] | None = None
) -> Any:
    """The stage-1 tuned teacher; defaults: the fetched LLM and the shipped head."""
    from darl_lite.distill.teacher_fetch import default_cache_dir
    from darl_lite.distill.teacher_tune import ProbeTeacher

    return ProbeTeacher.from_files(model_dir or default_cache_dir(), head or shipped_head_path())


def load_teacher(
    model_dir: str | os.PathLike[str] | None = None,
    head: str | os.PathLike[str] | None = None,
    top: str | os.PathLike[str] | None = None,
) -> Any:
    """The stage-1 teacher (``head``), or the stages 2-3 teacher (``top``: ``teacher_llm_top.npz``)."""
    if top is None:
        return load_probe_teacher(model_dir, head)
    if head is not None:
        raise InputError("give either a stage-1 head (--head) or a stages 2-3 top file (--top), not both")
    from darl_lite.distill.staged_teacher import StagedTeacher
    from darl_lite.distill.teacher_fetch import default_cache_dir

    return StagedTeacher.from_files(model_dir or default_cache_dir(), top)


def serve_teacher(
    model_dir: str | os.PathLike[str] | None = None,
    head: str | os.PathLike[str] | None = None,
    *,
    top: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Load the teacher once and serve it with uvicorn until interrupted."""
    if max_body_bytes < 1:
        raise InputError(f"max_body_bytes must be >= 1; got {max_body_bytes}")
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError.for_module("uvicorn", "serve") from exc
    logger.info("loading the teacher (model %s, head %s)", model_dir or "fetched", top or head or "shipped")
    engine = TeacherEngine(load_teacher(model_dir, head, top), model_name=model_name, max_batch=max_batch)
    app = create_app(engine, max_body_bytes=max_body_bytes)
    logger.info("serving %r at http://%s:%d (POST /classify)", model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_TEXT_CHARS",
    "DEFAULT_MODEL_NAME",
    "TeacherEngine",
    "create_app",
    "load_probe_teacher",
    "load_teacher",
    "serve_teacher",
    "shipped_head_path",
]
