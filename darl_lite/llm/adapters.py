"""Adapters between the runtime's protocols: any :class:`~darl_lite.Teacher` as a scorer fallback.

A teacher grades :class:`~darl_lite.types.Pair` objects; the scorer hands a fallback ``(query,
item)`` tuples. :class:`darl_lite.distill.teachers.HFTeacher` (a local model with a classification
head) reads ``pair.query`` and so cannot take tuples directly; wrapped here, it can.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from darl_lite.teacher import Teacher
from darl_lite.types import Pair


def teacher_fallback(teacher: Teacher) -> Callable[[Sequence[tuple[str, str]]], NDArray[np.float64]]:
    """A :data:`darl_lite.Fallback` that grades the routed pairs with ``teacher.predict_proba``."""

    def fallback(pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
        probs = teacher.predict_proba([Pair(query, item) for query, item in pairs])
        return np.asarray(probs, np.float64)

    fallback.__qualname__ = f"teacher_fallback({teacher.name})"
    return fallback


__all__ = ["teacher_fallback"]
