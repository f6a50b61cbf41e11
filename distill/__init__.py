"""Distillation stage: train a small cross-encoder student on a teacher's soft grade distributions.

This subpackage needs the ``distill`` extra (torch, transformers, tqdm, the MiniLM backbone). The
runtime package :mod:`darl_lite` never imports it. Importing ``darl_lite.distill`` is cheap: it only
checks that torch and transformers are installed (so a missing extra fails here, with the pip
command that fixes it, rather than deep inside a training run) and loads each submodule on first
use of one of its names.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from darl_lite.errors import MissingExtraError

for _module in ("torch", "transformers"):
    if importlib.util.find_spec(_module) is None:
        raise MissingExtraError.for_module(_module, "distill")

if TYPE_CHECKING:  # re-exports for type checkers; at run time __getattr__ resolves them
    from darl_lite.distill.backbone import load_student, minilm_path
    from darl_lite.distill.losses import distillation_loss, hard_ce_loss, soft_kl_loss
    from darl_lite.distill.teachers import HFTeacher
    from darl_lite.distill.trainer import (
        DistillConfig,
        TrainResult,
        distill_student,
        predict_logits,
        save_student,
    )

#: Public name -> submodule that defines it; resolved lazily by :func:`__getattr__`.
_EXPORTS: dict[str, str] = {
    "minilm_path": "backbone",
    "load_student": "backbone",
    "soft_kl_loss": "losses",
    "hard_ce_loss": "losses",
    "distillation_loss": "losses",
    "DistillConfig": "trainer",
    "TrainResult": "trainer",
    "distill_student": "trainer",
    "predict_logits": "trainer",
    "save_student": "trainer",
    "HFTeacher": "teachers",
}

__all__ = [
    "DistillConfig",
    "HFTeacher",
    "TrainResult",
    "distill_student",
    "distillation_loss",
    "hard_ce_loss",
    "load_student",
    "minilm_path",
    "predict_logits",
    "save_student",
    "soft_kl_loss",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` only when it is first used (PEP 562)."""
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
