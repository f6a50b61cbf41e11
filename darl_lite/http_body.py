"""Request-body plumbing both HTTP servers share: the status-carrying error and the capped body read.

``darl-lite serve`` (:mod:`darl_lite.serve`) and the teacher server
(:mod:`darl_lite.distill.teacher_server`) answer errors in different shapes, but both refuse an
oversized body the same way: as soon as it passes the cap, declared or streamed. Torch-free and
framework-free: ``request`` is anything with Starlette's ``headers`` and async ``stream()``.
"""

from __future__ import annotations

from typing import Any


class HTTPProblem(Exception):
    """An error the server answers with ``status`` and ``message`` (in its own error shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Any, max_body_bytes: int, hint: str = "") -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_body_bytes`` (declared or streamed).

    ``hint`` is appended to the message (e.g. the option that raises the cap).
    """
    too_big = f"request body exceeds the limit of {max_body_bytes} bytes{hint}"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise HTTPProblem(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise HTTPProblem(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["HTTPProblem", "read_body"]
