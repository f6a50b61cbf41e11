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
    from darl_lite.distill.dasa import SelectionResult, random_selection, select_augmentation
    from darl_lite.distill.graded_loss import graded_distillation_loss, soft_graded_loss
    from darl_lite.distill.local_llm import LocalLLMGrader
    from darl_lite.distill.losses import distillation_loss, hard_ce_loss, soft_kl_loss
    from darl_lite.distill.recipe import RecipeConfig, RecipeResult, run_recipe
    from darl_lite.distill.stages import (
        LoraSettings,
        choose_interpolation,
        extract_features,
        finetune,
        linear_probe,
    )
    from darl_lite.distill.teacher_fetch import fetch_teacher
    from darl_lite.distill.teachers import HFTeacher
    from darl_lite.distill.trainer import (
        DistillConfig,
        TrainResult,
        distill_student,
        predict_logits,
        save_student,
    )

#: Public name -> submodule that defines it; resolved lazily by :func:`__getattr__`.
# ``graded_loss`` (the function) is not re-exported: its name is its submodule's, and importing the
# submodule would shadow it here. Import it from ``darl_lite.distill.graded_loss``.
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
    "graded_distillation_loss": "graded_loss",
    "soft_graded_loss": "graded_loss",
    "SelectionResult": "dasa",
    "random_selection": "dasa",
    "select_augmentation": "dasa",
    "LoraSettings": "stages",
    "choose_interpolation": "stages",
    "extract_features": "stages",
    "finetune": "stages",
    "linear_probe": "stages",
    "RecipeConfig": "recipe",
    "RecipeResult": "recipe",
    "run_recipe": "recipe",
    "fetch_teacher": "teacher_fetch",
    "LocalLLMGrader": "local_llm",
}

__all__ = [
    "DistillConfig",
    "HFTeacher",
    "LocalLLMGrader",
    "LoraSettings",
    "RecipeConfig",
    "RecipeResult",
    "SelectionResult",
    "TrainResult",
    "choose_interpolation",
    "distill_student",
    "distillation_loss",
    "extract_features",
    "fetch_teacher",
    "finetune",
    "graded_distillation_loss",
    "hard_ce_loss",
    "linear_probe",
    "load_student",
    "minilm_path",
    "predict_logits",
    "random_selection",
    "run_recipe",
    "save_student",
    "select_augmentation",
    "soft_graded_loss",
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
