"""Checks of a client's settings and of a call's pairs, shared by the fallback clients."""

from __future__ import annotations

from collections.abc import Sequence

from darl_lite.errors import InputError


def check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}; got {value!r}")


def check_pairs(pairs: object) -> list[tuple[str, str]]:
    """The pairs as a list of ``(query, item)`` string tuples; :class:`InputError` naming ``pairs[i]``."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InputError(f"pairs must be a list of (query, item) tuples; got {type(pairs).__name__}")
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise InputError(f"pairs[{i}] must be a (query, item) tuple of two strings; got {pair!r:.80}")
        out.append((pair[0], pair[1]))
    return out


def server_root(base_url: object) -> str:
    """The server root of ``base_url``: trailing ``/`` and ``/v1`` removed; http(s) required."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InputError(f"base_url must be an http:// or https:// URL; got {base_url!r}")
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


__all__ = ["check_int", "check_pairs", "server_root"]
