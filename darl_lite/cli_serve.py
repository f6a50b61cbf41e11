"""``darl-lite serve``: its options and handler.

The fallback and routing-budget options are :mod:`darl_lite.cli_fallback`'s, shared with
``darl-lite score``; the scorer and the server are imported by the handler.
"""

from __future__ import annotations

import argparse
from typing import Any

from darl_lite.cli_fallback import add_fallback_arguments, scorer_from_args, secret_from_env


def _cmd_serve(args: argparse.Namespace) -> int:
    from darl_lite.serve import ServeConfig, serve

    token = secret_from_env(
        "--token-env",
        args.token_env,
        "export the bearer token in it, or drop --token-env to serve without one",
    )
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_items=args.max_items,
        max_body_bytes=args.max_body_bytes,
        openapi=not args.no_openapi,
        batching=not args.no_batching,
        max_batch_pairs=args.max_batch_pairs,
        model_workers=args.model_workers,
        gather_wait_ms=args.gather_wait_ms,
    )
    with scorer_from_args(args) as scorer:
        serve(scorer, config, token=token)
    return 0


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``darl-lite`` subcommands."""
    srv = subparsers.add_parser(
        "serve", allow_abbrev=False, help="serve a bundle over HTTP (needs the serve extra)"
    )
    srv.add_argument("bundle")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument(
        "--token-env", default=None, help="name of the environment variable holding the bearer token"
    )
    srv.add_argument("--max-items", type=int, default=1000, help="items per request (all queries)")
    srv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size limit")
    srv.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    srv.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = auto)")
    srv.add_argument(
        "--no-spinning",
        action="store_true",
        help="onnxruntime's threads sleep between ops instead of spinning (for a node that shares its cores)",
    )
    srv.add_argument("--no-openapi", action="store_true", help="serve no /openapi.json and no /docs page")
    srv.add_argument(
        "--no-batching",
        action="store_true",
        help="score each request on its own instead of coalescing concurrent ones into shared model passes",
    )
    srv.add_argument(
        "--max-batch-pairs",
        type=int,
        default=256,
        help="pairs of one coalesced model pass at most (default 256; a larger request goes alone)",
    )
    srv.add_argument(
        "--model-workers",
        type=int,
        default=2,
        help="model passes at once, each its own session with a share of --threads (default 2)",
    )
    srv.add_argument(
        "--gather-wait-ms",
        type=float,
        default=2.0,
        help="while another model pass runs, a free worker waits this long at most for more requests "
        "to share its pass, and only while fewer are held than the clients' recent concurrency "
        "(default 2; 0: start on whatever is queued)",
    )
    add_fallback_arguments(srv)
    srv.set_defaults(handler=_cmd_serve)


__all__ = ["register"]
