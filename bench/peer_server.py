"""The peer server for ``bench.load_server``: sentence-transformers' own int8 export behind FastAPI.

    python -m bench.peer_server --student darl-lite-run/student --bundle darl-lite-run/bundle --port 8081 \
        --threads 2 &
    python -m bench.load_server --url http://127.0.0.1:8081 --out bench/results/load_peer.json

Why this peer: a new user's ready-made servers did not serve this model (``infinity-emb`` 0.0.78 does
not start its optimum engine on current optimum/torch, and its torch engine serves a 3-grade
cross-encoder only as single-text ``classify``), so the peer is the strongest export a user gets
from sentence-transformers itself — ``export_dynamic_quantized_onnx_model(model, preset)``, its
preset for this CPU (``avx512_vnni`` with VNNI, else ``avx512`` or ``avx2``; ``bench.common.st_int8_preset``)
of the same student weights, loaded with ``CrossEncoder(backend="onnx")`` on the same onnxruntime
session options (``bench.common.prepare_st_models`` / ``ContenderFactory``) — behind the smallest
FastAPI app that speaks darl-lite's request shape: ``POST /score`` with ``{"query", "items"}`` →
``{"results": [{"grade", "probabilities", "expected_relevance"}, ...]}`` and ``GET /healthz``.
Scoring runs in the event loop's thread pool, as ``darl-lite serve`` does (``Scorer.ascore``).
"""

# No ``from __future__ import annotations``: FastAPI reads the route's ``Request`` annotation at
# runtime, and ``Request`` is imported inside :func:`create_peer_app` (as in darl_lite.serve).
import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from bench.common import BATCH_SIZE, prepare_st_models, st_int8_file, st_int8_preset, thread_env

GAINS = (0.0, 1.0, 2.0)  # darl-lite's grade gains (irrelevant, weak, strong)


def parse_body(body: object) -> tuple[str, list[str]]:
    """``(query, items)`` from a ``/score`` body, or ValueError naming the field."""
    if not isinstance(body, dict) or set(body) != {"query", "items"}:
        raise ValueError('body must be an object with exactly "query" and "items"')
    query, items = body["query"], body["items"]
    if (
        not isinstance(query, str)
        or not isinstance(items, list)
        or not all(isinstance(i, str) for i in items)
    ):
        raise ValueError("query must be a string and items a list of strings")
    return query, items


def create_peer_app(model: Any, max_items: int = 1000) -> Any:
    """The FastAPI app scoring with ``model`` (a sentence-transformers ``CrossEncoder``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="sentence-transformers int8 peer", docs_url=None, redoc_url=None, openapi_url=None)

    def score(query: str, items: list[str]) -> list[dict[str, Any]]:
        probs = model.predict(
            [(query, item) for item in items],
            batch_size=BATCH_SIZE,
            apply_softmax=True,
            show_progress_bar=False,
        )
        rows = probs.tolist() if len(items) else []
        return [
            {
                "grade": max(range(len(p)), key=p.__getitem__),
                "probabilities": p,
                "expected_relevance": sum(g * x for g, x in zip(GAINS, p, strict=True)),
            }
            for p in rows
        ]

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok", "peer": f"sentence-transformers CrossEncoder, ONNX int8 ({st_int8_preset()})"}

    @app.post("/score")
    async def score_route(request: Request) -> Any:
        try:
            query, items = parse_body(await request.json())
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        if len(items) > max_items:
            return JSONResponse({"detail": f"{len(items)} items exceeds {max_items}"}, status_code=422)
        loop = asyncio.get_running_loop()
        return JSONResponse({"results": await loop.run_in_executor(None, score, query, items)})

    return app


def load_peer_model(student: Path, work: Path, threads: int, max_length: int) -> Any:
    """ST's int8 export of ``student`` (its CPU's preset), made once into ``work``, on ``threads`` threads."""
    import torch
    from sentence_transformers import CrossEncoder

    from darl_lite.inference import SessionConfig

    torch.set_num_threads(max(threads, 1))
    st_dir = prepare_st_models(student, work, max_length)
    return CrossEncoder(
        str(st_dir),
        backend="onnx",
        device="cpu",
        max_length=max_length,
        model_kwargs={
            "file_name": st_int8_file(st_dir),
            "provider": "CPUExecutionProvider",
            "session_options": SessionConfig(intra_op_threads=threads).session_options(),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="the student as an HF folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/darl-bench-work"), help="ST exports go here")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = auto)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per pair (default 64)")
    parser.add_argument("--bundle", type=Path, default=None, help="take --max-length from this bundle")
    args = parser.parse_args()
    if args.bundle is not None:
        from darl_lite.bundle import load_bundle

        args.max_length = load_bundle(args.bundle, verify=False).max_length
    if args.threads:  # the tokenizers' and BLAS pools read these at first use
        os.environ.update({k: v for k, v in thread_env(args.threads).items() if k.endswith("_THREADS")})
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import uvicorn

    model = load_peer_model(args.student, args.work.resolve(), args.threads, args.max_length)
    uvicorn.run(
        create_peer_app(model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
