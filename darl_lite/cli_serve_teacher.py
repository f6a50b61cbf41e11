"""``darl-lite distill serve-teacher``: the tuned teacher over HTTP in vLLM's classification protocol.

Only the parser lives here, so ``darl-lite`` stays importable without torch; the handler imports
:mod:`darl_lite.distill.teacher_server` (the ``distill`` and ``serve`` extras) when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(distill: Any) -> None:
    """Add ``serve-teacher`` to the ``distill`` subcommands (an argparse subparsers object)."""
    cmd = distill.add_parser(
        "serve-teacher",
        allow_abbrev=False,
        help="serve the tuned teacher (LLM + probe head) on POST /classify, vLLM's classification API",
    )
    cmd.add_argument("--model", default=None, help="LLM folder (default: the fetch-teacher cache)")
    cmd.add_argument("--head", default=None, help="probe head .npz (default: the shipped teacher's head)")
    cmd.add_argument(
        "--top", default=None, help="stages 2-3 teacher file (teacher_llm_top.npz) instead of a probe head"
    )
    cmd.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--name", default="darl-lite-teacher", help="the model name clients send and see")
    cmd.add_argument("--max-batch", type=int, default=64, help="inputs per request at most (default: 64)")
    cmd.add_argument(
        "--max-body-bytes", type=int, default=4_000_000, help="request body size limit (default: 4 MB)"
    )
    cmd.set_defaults(handler=_cmd_serve_teacher)


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    from darl_lite.distill.teacher_server import serve_teacher

    serve_teacher(
        args.model,
        args.head,
        top=args.top,
        host=args.host,
        port=args.port,
        model_name=args.name,
        max_batch=args.max_batch,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


__all__ = ["register"]
