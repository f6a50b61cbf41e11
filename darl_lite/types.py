"""Plain value types shared by every stage: a graded pair and the grade scheme."""

from __future__ import annotations

from dataclasses import dataclass

#: The ordered grades of the shipped data: index = grade.
GRADE_NAMES: tuple[str, ...] = ("irrelevant", "weak", "strong")
#: NDCG gain of each grade (linear, as trec_eval uses for DBpedia-Entity).
GRADE_GAINS: tuple[float, ...] = (0.0, 1.0, 2.0)


@dataclass(frozen=True, slots=True)
class Pair:
    """One query–item pair; ``grade`` is the human grade where known (None for unlabeled pairs)."""

    query: str
    item: str
    grade: int | None = None
    query_id: str | None = None
    query_class: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The identity of a pair across files: its two texts, exactly as given."""
        return (self.query, self.item)
