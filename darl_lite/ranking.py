"""Ranking views of scored pairs: the order a reranker returns, with each item's input index.

sentence-transformers' ``CrossEncoder.rank(query, documents, top_k, return_documents)`` is the model:
results sorted by score, best first, each carrying the index of its document in the input list.
Here the score is the expected relevance (sum of grade probability × gain); ties keep input order.
``relevance_score`` rescales it to [0, 1] by the largest gain, the range reranking APIs (Cohere,
Jina) promise their clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from darl_lite.errors import InputError

if TYPE_CHECKING:  # darl_lite.scorer imports this module
    from darl_lite.scorer import PairScore


@dataclass(frozen=True, slots=True)
class RankedItem:
    """One item of a ranking: its input ``index``, its full :class:`PairScore`, and optionally its text."""

    index: int  # position of the item in the input list
    score: PairScore
    relevance_score: float  # expected relevance / the largest grade gain, in [0, 1]
    item: str | None = None  # the item's text, when asked for (return_items=True)

    @property
    def expected_relevance(self) -> float:
        return self.score.expected_relevance

    @property
    def grade(self) -> int:
        return self.score.grade


def check_top_k(top_k: object, field: str = "top_k") -> int | None:
    """``top_k`` as an int >= 1, or None for all; an :class:`InputError` naming ``field`` otherwise."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InputError(f"{field} must be a whole number >= 1 or None, got {type(top_k).__name__}")
    if top_k < 1:
        raise InputError(f"{field} must be >= 1 (or None for every item), got {top_k}")
    return top_k


def relevance_scale(gains: Sequence[float]) -> float:
    """The divisor that maps expected relevance onto [0, 1]: the largest gain (1 if all are 0)."""
    top = max((float(g) for g in gains), default=0.0)
    return top if top > 0 else 1.0


def relevance_score(expected_relevance: float, scale: float) -> float:
    """Expected relevance on [0, 1]: divided by ``scale`` (:func:`relevance_scale`), clipped."""
    return min(max(expected_relevance / scale, 0.0), 1.0)


def rank_results(
    results: Sequence[PairScore],
    items: Sequence[str],
    *,
    gains: Sequence[float],
    top_k: int | None = None,
    return_items: bool = False,
) -> list[RankedItem]:
    """Sort ``results`` (one per item, input order) by expected relevance, best first, ties by index."""
    scale = relevance_scale(gains)
    order = sorted(range(len(results)), key=lambda i: (-results[i].expected_relevance, i))
    if top_k is not None:
        order = order[:top_k]
    return [
        RankedItem(
            index=i,
            score=results[i],
            relevance_score=relevance_score(results[i].expected_relevance, scale),
            item=items[i] if return_items else None,
        )
        for i in order
    ]


__all__ = ["RankedItem", "check_top_k", "rank_results", "relevance_scale", "relevance_score"]
