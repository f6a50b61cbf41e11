"""Train a student on teacher probabilities (and human grades where known), predict, and save it."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.distill.backbone import DEFAULT_MAX_LENGTH, TokenizedPairs
from darl_lite.distill.losses import distillation_loss
from darl_lite.distill.train_loop import (
    Checkpoints,
    TrainLoop,
    total_steps,
)
from darl_lite.errors import InputError
from darl_lite.metrics import check_probability_rows
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: Tolerance on teacher rows summing to 1 (float32 files written by other tools round).
_ROW_SUM_ATOL = 1e-3


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Hyper-parameters of one distillation run; invalid values raise :class:`InputError` at once.

    ``max_steps`` (if set) stops the run early, before ``epochs`` are done; the learning-rate
    schedule (linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0) is laid over
    the steps that will actually run. ``grad_clip`` is the max global gradient norm (``None``: off).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 2.0
    alpha: float = 0.5
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    max_steps: int | None = None
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0; got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must lie in [0, 1); got {self.warmup_ratio}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (0 <= self.alpha <= 1, f"alpha must lie in [0, 1]; got {self.alpha}"),
            (self.max_length >= 8, f"max_length must be >= 8 tokens; got {self.max_length}"),
            (
                self.max_steps is None or self.max_steps >= 1,
                f"max_steps must be None or >= 1; got {self.max_steps}",
            ),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be None or > 0; got {self.grad_clip}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"DistillConfig: {message}")


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a run did: the loss of every optimiser step, in order, and the wall time it took."""

    losses: tuple[float, ...]
    seconds: float
    steps: int
    pairs_seen: int

    @property
    def pairs_per_second(self) -> float:
        """Training throughput (tokenisation included), for sizing runs."""
        return self.pairs_seen / self.seconds if self.seconds > 0 else math.inf


def _validate_inputs(pairs: Sequence[Pair], teacher_probs: np.ndarray, n_labels: int) -> NDArray[np.float32]:
    if len(pairs) == 0:
        raise InputError(
            "distill_student got no pairs; pass at least one pair with its teacher probabilities"
        )
    probs = np.asarray(teacher_probs)
    if probs.ndim != 2 or probs.shape != (len(pairs), n_labels):
        raise InputError(
            f"teacher_probs must have shape (len(pairs), n_labels) = ({len(pairs)}, {n_labels}) to match "
            f"the pairs and the student's head; got {probs.shape}"
        )
    if not np.issubdtype(probs.dtype, np.floating) or not np.all(np.isfinite(probs)):
        raise InputError("teacher_probs must be finite floating-point probabilities")
    check_probability_rows(probs, "teacher_probs", _ROW_SUM_ATOL)
    for i, pair in enumerate(pairs):
        if pair.grade is not None and not 0 <= pair.grade < n_labels:
            raise InputError(f"pairs[{i}].grade must be None or in [0, {n_labels}); got {pair.grade}")
    return probs.astype(np.float32, copy=False)


def distill_student(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    teacher_probs: np.ndarray,
    config: DistillConfig | None = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
) -> TrainResult:
    """Train ``model`` in place on ``(pairs, teacher_probs)`` with :func:`distillation_loss`.

    Pairs are tokenised once as (query, item) sentence pairs, truncated to ``config.max_length``, and
    batched by length. Human grades come from ``Pair.grade`` (``None`` counts as ungraded). The
    optimiser is AdamW (no decay on biases and LayerNorm weights) with linear warm-up and decay. The
    run seeds torch and the batch order with ``config.seed``; it does not change torch's thread count
    (that is the caller's choice). The model is left in eval mode.

    With ``checkpoint_dir`` the run writes a checkpoint every ``checkpoint_every`` steps and at the
    end: model, optimiser and scheduler state, the step, the losses so far and the torch and numpy
    RNG states, atomically (temporary directory, then rename; the newest two are kept). Called again
    with the same arguments and directory, it resumes from the newest checkpoint and ends with the
    same weights as a run that was never interrupted (bit for bit on the same machine and thread
    count); a finished run's checkpoint just restores the final weights. A checkpoint of a different
    run (config, pairs, targets or model shape) is refused with :class:`InputError`. Checkpoints are
    read with ``torch.load(weights_only=True)``, which never unpickles code. ``TrainResult.seconds``
    covers this call only; ``losses``, ``steps`` and ``pairs_seen`` cover the whole run.
    """
    config = config or DistillConfig()
    probs = _validate_inputs(pairs, teacher_probs, int(model.config.num_labels))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    data = TokenizedPairs.of(model, tokenizer, pairs, config.max_length)
    targets = torch.from_numpy(probs)
    grades = torch.tensor([-1 if p.grade is None else p.grade for p in pairs], dtype=torch.long)
    checkpoints = Checkpoints.for_run(checkpoint_dir, asdict(config), pairs, [probs], model, checkpoint_every)
    loop = TrainLoop(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        total_steps=total_steps(len(pairs), config.batch_size, config.epochs, config.max_steps),
        grad_clip=config.grad_clip,
        checkpoints=checkpoints,
        what="distillation",
        hint=f"lower lr (now {config.lr}) or check the teacher probabilities",
        progress=progress,
    )

    def loss_of(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distillation_loss(
            logits,
            targets[index].to(data.device),
            grades[index].to(data.device),
            temperature=config.temperature,
            alpha=config.alpha,
        )

    loop.train_on(data, config.batch_size, rng, loss_of)
    seconds = time.perf_counter() - started
    losses = loop.losses
    logger.info(
        "distilled %d steps (%d pairs) in %.1f s: loss %.4f -> %.4f",
        len(losses),
        loop.pairs_seen,
        seconds,
        losses[0],
        losses[-1],
    )
    return TrainResult(losses=tuple(losses), seconds=seconds, steps=len(losses), pairs_seen=loop.pairs_seen)


def predict_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> NDArray[np.float32]:
    """Student logits ``(len(pairs), n_labels)`` in input order; ``(0, n_labels)`` for no pairs.

    Runs in eval mode under ``no_grad`` in length-sorted batches (for speed), then restores input
    order and the model's previous train/eval mode.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}")
    n_labels = int(model.config.num_labels)
    out = np.empty((len(pairs), n_labels), dtype=np.float32)
    if not pairs:
        return out
    data = TokenizedPairs.of(model, tokenizer, pairs, max_length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in data.sorted_batches(batch_size):
                logits = model(**data.collate(idx)).logits
                out[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer to ``out_dir`` so :func:`load_student` can reload them."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    logger.info("saved student to %s", path)
    return path
