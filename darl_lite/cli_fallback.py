"""The LLM fallback options shared by ``darl-lite score`` and ``darl-lite serve``.

One definition of ``--fallback-url``, ``--fallback-protocol``, ``--fallback-model``,
``--fallback-timeout``, ``--fallback-call-timeout``, ``--fallback-retries``,
``--fallback-concurrency``, ``--fallback-token-env`` and ``--route-budget``, and one function
that turns them into the scorer's ``fallback`` and ``budget``. Torch-free; httpx is imported only
when a URL is given.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from darl_lite.budget import RouteBudget
from darl_lite.errors import InputError
from darl_lite.llm.factory import PROTOCOLS, GradeClient, fallback_from_url

if TYPE_CHECKING:
    from darl_lite.scorer import PairScore, Scorer


def add_fallback_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fallback and routing-budget options to a subcommand's parser."""
    group = parser.add_argument_group("LLM fallback (the pairs the student is unsure of go to it)")
    group.add_argument(
        "--fallback-url",
        default=None,
        help="the teacher's server root, e.g. http://127.0.0.1:8000 (darl-lite distill serve-teacher, vLLM)",
    )
    group.add_argument(
        "--fallback-protocol",
        default="classify",
        choices=PROTOCOLS,
        help="classify: vLLM's /classify (the tuned teacher, default); completions: OpenAI logprobs",
    )
    group.add_argument("--fallback-model", default=None, help="served model name (required for completions)")
    group.add_argument(
        "--fallback-timeout",
        type=float,
        default=None,
        help="seconds per request (default: 10 for classify, 2 for completions)",
    )
    group.add_argument(
        "--fallback-call-timeout",
        type=float,
        default=None,
        help="seconds one scoring call may wait for the fallback (default: the worst case of one request)",
    )
    group.add_argument("--fallback-retries", type=int, default=2, help="retries per request (default: 2)")
    group.add_argument(
        "--fallback-concurrency",
        type=int,
        default=None,
        help="requests in flight at most (default: 4 for classify, 8 for completions)",
    )
    group.add_argument(
        "--fallback-token-env",
        default=None,
        help="name of the environment variable holding the fallback's bearer token (vLLM --api-key)",
    )
    group.add_argument(
        "--route-budget",
        type=float,
        default=None,
        help="most pairs routed to the fallback over a sliding minute, as a fraction (e.g. 0.1)",
    )


def fallback_from_args(args: argparse.Namespace) -> tuple[GradeClient | None, RouteBudget | None]:
    """The client (None without ``--fallback-url``) and the sliding-minute budget (None without
    ``--route-budget``); bad settings raise :class:`~darl_lite.errors.InputError`."""
    budget = RouteBudget(args.route_budget, window_s=60.0) if args.route_budget is not None else None
    if args.fallback_url is None:
        return None, budget
    api_key = secret_from_env(
        "--fallback-token-env",
        args.fallback_token_env,
        "export the fallback's token in it, or drop the option",
    )
    client = fallback_from_url(
        args.fallback_url,
        api_key=api_key,
        protocol=args.fallback_protocol,
        model=args.fallback_model,
        timeout_s=args.fallback_timeout,
        call_timeout_s=args.fallback_call_timeout,
        retries=args.fallback_retries,
        max_concurrency=args.fallback_concurrency,
    )
    return client, budget


def secret_from_env(option: str, var: str | None, fix: str) -> str | None:
    """The value of the environment variable ``var`` named by ``option`` (None when no ``var``).

    An unset or blank variable is an :class:`InputError` (``fix`` says what to do): serving with an
    empty token would look configured and accept anyone.
    """
    if not var:
        return None
    value = os.environ.get(var, "")
    if not value.strip():
        raise InputError(f"{option} {var}: that environment variable is unset or empty; {fix}")
    return value


@contextmanager
def scorer_from_args(args: argparse.Namespace) -> Iterator[Scorer]:
    """The bundle's scorer with the fallback and budget the options ask for; closes the fallback on exit.

    Reads ``bundle``, ``precision``, ``threads`` and ``no_spinning`` besides the fallback options.
    """
    from darl_lite.inference import SessionConfig
    from darl_lite.scorer import Scorer

    fallback, budget = fallback_from_args(args)
    try:
        yield Scorer.load(
            args.bundle,
            precision=args.precision,
            session=SessionConfig(
                intra_op_threads=args.threads, spinning=not getattr(args, "no_spinning", False)
            ),
            fallback=fallback,
            budget=budget,
        )
    finally:
        if fallback is not None:
            fallback.close()


def routing_summary(results: Sequence[PairScore]) -> str:
    """One line on what routing did (empty when nothing was routed): who answered, why not the LLM."""
    routed = [r for r in results if r.routed]
    if not routed:
        return ""
    by_llm = sum(r.source == "llm" for r in routed)
    kept = [r for r in routed if r.source != "llm"]
    line = f"routed {len(routed)} of {len(results)} pairs; the fallback graded {by_llm}"
    if kept:
        line += f"; {len(kept)} kept the student's answer ({kept[0].note or 'no note'})"
    return line


__all__ = ["add_fallback_arguments", "fallback_from_args", "routing_summary"]
