"""What a teacher is: anything that maps pairs to a probability distribution over the ordered grades.

The runtime and the distillation code depend only on this protocol. Implementations:
:class:`darl_lite.teacher_file.FileTeacher` (precomputed outputs, e.g. from a GPU cluster; no torch)
and :class:`darl_lite.distill.teachers.HFTeacher` (a local Hugging Face model with a classification head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from darl_lite.types import Pair


@runtime_checkable
class Teacher(Protocol):
    """Grades pairs. ``kind`` says what it is in reports: ``llm``, ``stand-in``, ``encoder``, ``file``…"""

    name: str
    kind: str

    def predict_proba(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        """Grade probabilities ``(len(pairs), n_grades)``, each row summing to 1, in input order."""
        ...
