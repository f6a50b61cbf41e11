"""A minimal OpenAI-compatible completions server for a local Hugging Face causal LM.

Enough of the protocol for a grader: ``POST /v1/completions`` (greedy decoding, ``logprobs=k`` gives
the legacy ``choices[0].logprobs.top_logprobs=[{token: logprob}, ...]``), ``GET /v1/models`` and
``GET /health``. It lets :class:`darl_lite.llm.OpenAIGradeClient` talk to a local teacher exactly as
it talks to vLLM, and the tests run the real client against a real model over loopback.

Built on the standard library's ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, one thread per
connection, forward passes serialised): no extra dependency, and small enough to read in one go.
It is not a production inference server (no batching across requests, no KV cache): use vLLM for that.

    python -m darl_lite.distill.openai_server MODEL_DIR --port 8000   # binds 127.0.0.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.distill.local_llm import NextTokenModel
from darl_lite.errors import InputError

logger = logging.getLogger(__name__)

#: Largest request body accepted, in bytes (a prompt is a few KB).
MAX_BODY_BYTES = 1 << 20
#: Most tokens one completion may generate (each costs a full forward pass without a KV cache).
MAX_NEW_TOKENS = 64


class _BadRequest(Exception):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class CompletionEngine:
    """Turns a completions request body into a response body; HTTP-free, so it is easy to test."""

    def __init__(self, lm: NextTokenModel, model_name: str, max_logprobs: int = 20) -> None:
        self.lm = lm
        self.model_name = model_name
        self.max_logprobs = max_logprobs

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "darl-lite"}],
        }

    def complete(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise _BadRequest(
                f"model {model!r} is not served here; GET /v1/models lists {self.model_name!r}",
                HTTPStatus.NOT_FOUND,
            )
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
            raise _BadRequest("'prompt' must be a non-empty string or a list of them")
        max_tokens = _int_field(body, "max_tokens", 16, 1, MAX_NEW_TOKENS)
        k = body.get("logprobs")
        if k is not None:
            k = _int_field(body, "logprobs", 0, 0, self.max_logprobs)
        temperature = body.get("temperature", 0)
        if not isinstance(temperature, (int, float)) or temperature != 0:
            raise _BadRequest(f"only greedy decoding is served: 'temperature' must be 0; got {temperature!r}")
        if body.get("echo"):
            raise _BadRequest("'echo' is not supported")
        choices = []
        prompt_tokens = completion_tokens = 0
        for index, text in enumerate(prompts):
            choice, n_prompt = self._complete_one(text, max_tokens, k)
            choices.append({"index": index, **choice})
            prompt_tokens += n_prompt
            completion_tokens += max_tokens
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _complete_one(self, prompt: str, max_tokens: int, k: int | None) -> tuple[dict[str, Any], int]:
        texts = self.lm.token_texts
        tokenizer = self.lm.tokenizer
        try:
            ids = self.lm.encode(prompt)
        except InputError as exc:
            raise _BadRequest(str(exc)) from exc
        n_prompt = len(ids)
        generated: list[int] = []
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = len(prompt)
        for _ in range(max_tokens):
            logprobs = self.lm.next_token_logprobs_ids([ids + generated])[0]
            best = int(torch.argmax(logprobs))
            generated.append(best)
            text = texts[best] if best < len(texts) else ""
            tokens.append(text)
            token_logprobs.append(float(logprobs[best]))
            offsets.append(offset)
            offset += len(text)
            if k:
                values, indices = torch.topk(logprobs, min(k, logprobs.numel()))
                candidates: dict[str, float] = {}
                for value, i in zip(values.tolist(), indices.tolist(), strict=True):
                    token = texts[i] if i < len(texts) else ""
                    candidates.setdefault(token, _finite(value))  # keep the likelier of equal texts
                top.append(candidates)
            if best == tokenizer.eos_token_id:
                break
        logprobs_out = None
        if k is not None:
            logprobs_out = {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top if k else None,
                "text_offset": offsets,
            }
        finish = "stop" if generated and generated[-1] == tokenizer.eos_token_id else "length"
        text_out = tokenizer.decode(generated, skip_special_tokens=True)
        return {"text": text_out, "logprobs": logprobs_out, "finish_reason": finish}, n_prompt


def _finite(value: float) -> float:
    """JSON has no -inf: report an impossible token as a very low logprob, as vLLM does."""
    return value if math.isfinite(value) else -9999.0


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(f"{name!r} must be an integer in [{low}, {high}]; got {value!r}")
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
    timeout = 30  # seconds an idle keep-alive connection may hold its thread
    server: _Server

    def do_GET(self) -> None:
        if self.path in ("/health", "/healthz"):
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif self.path in ("/v1/models", "/models"):
            self._send(HTTPStatus.OK, self.server.engine.models())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}")

    def do_POST(self) -> None:
        if self.path not in ("/v1/completions", "/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            self.close_connection = True
            return
        try:
            body = json.loads(self.rfile.read(length))
            self._send(HTTPStatus.OK, self.server.engine.complete(body))
        except json.JSONDecodeError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}")
        except _BadRequest as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # a bug or an OOM must answer 500, not drop the connection
            logger.exception("completion failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def _error(self, status: HTTPStatus, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": int(status)}})

    def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: CompletionEngine) -> None:
        self.engine = engine
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every connection thread (they exit on the closed socket), so none outlives stop."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)


def make_server(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model_name: str = "local",
    max_logprobs: int = 20,
) -> _Server:
    """A bound, not yet serving, server (``serve_forever`` runs it). Port 0 picks a free port.

    A :class:`http.server.ThreadingHTTPServer` that can also wake its open connections
    (``close_connections``), which :func:`serve_in_thread`'s ``stop()`` uses.
    """
    if max_logprobs < 0:
        raise InputError(f"max_logprobs must be >= 0; got {max_logprobs}")
    engine = CompletionEngine(NextTokenModel(model, tokenizer, batch_size=1), model_name, max_logprobs)
    return _Server((host, port), engine)


def serve_in_thread(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model_name: str = "local",
    max_logprobs: int = 20,
) -> tuple[str, Callable[[], None]]:
    """Serve in a background thread; returns the base URL and a ``stop()`` that joins every thread."""
    server = make_server(model, tokenizer, host, port, model_name=model_name, max_logprobs=max_logprobs)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="darl-llm-server", daemon=True
    )
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    url = f"http://{bound_host!s}:{bound_port}"
    logger.info("serving %s at %s", model_name, url)

    def stop() -> None:
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()

    return url, stop


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m darl_lite.distill.openai_server MODEL_DIR``: serve a local model until Ctrl-C."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darl_lite.distill.backbone import local_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a local Hugging Face causal LM folder")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="the model name clients send (default: the folder name)")
    parser.add_argument("--max-logprobs", type=int, default=20)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("darl_lite")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    folder = local_model_dir(args.model_dir, "model_dir")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    name = args.name or folder.resolve().name
    server = make_server(
        model, tokenizer, args.host, args.port, model_name=name, max_logprobs=args.max_logprobs
    )
    logger.info("serving %s at http://%s:%d/v1", name, *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()


__all__ = ["CompletionEngine", "make_server", "serve_in_thread"]
