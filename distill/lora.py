"""LoRA adapters for fine-tuning stage 2 (:func:`darl_lite.distill.stages.finetune`), through peft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

from darl_lite.errors import InputError
from darl_lite.export.heads import head_of


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters for stage 2 (``peft``); ``target_modules=None`` takes peft's default per model type."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise InputError(
                f"LoraSettings: r and alpha must be >= 1 and dropout in [0, 1); got {self.r}, {self.alpha}, "
                f"{self.dropout}"
            )


def wrap_lora(model: PreTrainedModel, lora: LoraSettings) -> Any:
    """``model`` with LoRA adapters (peft) and a trainable copy of its head, for :func:`finetune`."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as exc:  # peft is part of the distill extra
        from darl_lite.errors import MissingExtraError

        raise MissingExtraError.for_module("peft", "distill") from exc
    head_name, _ = head_of(model)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
        modules_to_save=[head_name],
    )
    return get_peft_model(model, config)
