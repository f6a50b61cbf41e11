"""The three fine-tuning stages of the DaRL recipe, for any Hugging Face sequence-classification model.

* **Stage 1 — linear probe** (:func:`linear_probe`): the backbone stays frozen; the classification
  head's input is captured once per pair (:func:`extract_features`, a forward pre-hook on the
  ``classifier`` / ``score`` module, as ``export/onnx_export.py`` does) and the head alone is trained
  on those cached features — no backbone forward per epoch.
* **Stage 2 — fine-tune** (:func:`finetune`): every parameter (or LoRA adapters through ``peft``,
  merged back afterwards) from the probed head, with any loss of the form
  ``loss_fn(logits, target_probs, grades)`` — e.g. the graded loss. Starting from a probed head
  rather than a random one keeps the first gradients from distorting the pre-trained features
  (Kumar et al., 2022, "Fine-tuning can distort pretrained features", LP-FT).
* **Stage 3 — weight interpolation** (:func:`choose_interpolation`, WiSE-FT, Wortsman et al., 2022):
  ``θ(α) = (1 − α) · θ_start + α · θ_finetuned`` over every floating-point parameter and buffer, with
  ``α`` the grid value that maximises an objective on the dev sets (default: the mean macro-F1 over
  the dev sets given — ID and OOD — so neither distribution is traded away for the other).

Encoders (``classifier`` reads a pooled ``(N, H)`` vector) and decoder LLMs (``score`` reads every
position; the pair's vector is its last non-pad token, the position transformers' head reads) are
both supported. Heads that pool inside themselves from a 3-D input (RoBERTa's ``classifier``) are
refused by :func:`extract_features` with a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.calibration import softmax
from darl_lite.distill.backbone import (
    DEFAULT_MAX_LENGTH,
    TokenizedPairs,
)
from darl_lite.distill.lora import LoraSettings, wrap_lora
from darl_lite.distill.train_loop import (
    Checkpoints,
    TrainLoop,
    optimizer_step,
    total_steps,
)
from darl_lite.distill.trainer import predict_logits
from darl_lite.errors import InputError
from darl_lite.export.heads import capture_head_input, head_of, pool_head_input
from darl_lite.metrics import grading_report
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: ``loss_fn(logits (B, C), target_probs (B, C), grades (B,) with -1 = none) -> scalar``.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``objective({dev set: grading_report}) -> float`` (higher is better).
Objective = Callable[[Mapping[str, Mapping[str, float]]], float]

#: WiSE-FT mixing weights tried by default: 0, 0.1, …, 1.
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


# --------------------------------------------------------------------------------------------------
# The head and its input


def extract_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``(features (N, H), logits (N, C))``: the head's input per pair, and the model's logits.

    Eval mode, ``no_grad``, length-sorted batches; rows come back in input order. The head applied to
    ``features`` reproduces ``logits`` (the property stage 1 relies on). Only ``pairs``' query and
    item are read — never their grades.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}")
    head_name, head = head_of(model)
    n_labels = int(model.config.num_labels)
    if not pairs:
        width = int(getattr(head, "in_features", 0))
        return np.zeros((0, width), dtype=np.float32), np.zeros((0, n_labels), dtype=np.float32)
    data = TokenizedPairs.of(model, tokenizer, pairs, max_length)
    config_pad = getattr(model.config, "pad_token_id", None)
    feats: NDArray[np.float32] | None = None
    logits_out = np.empty((len(pairs), n_labels), dtype=np.float32)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(pairs), desc="features", unit="pair", disable=not progress)
    try:
        with torch.no_grad():
            for idx in data.sorted_batches(batch_size):
                inputs = data.collate(idx)
                with capture_head_input(head) as captured:
                    logits = model(**inputs).logits
                pooled = pool_head_input(captured["hidden"], inputs["input_ids"], head_name, config_pad)
                if feats is None:
                    feats = np.empty((len(pairs), pooled.shape[-1]), dtype=np.float32)
                feats[idx] = pooled.float().cpu().numpy()
                logits_out[idx] = logits.float().cpu().numpy()
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    assert feats is not None  # at least one batch ran
    return feats, logits_out


# --------------------------------------------------------------------------------------------------
# Training helpers


@dataclass(frozen=True)
class StageResult:
    """Losses of every optimiser step of one stage, in order, and its wall time."""

    losses: tuple[float, ...]
    seconds: float

    @property
    def steps(self) -> int:
        return len(self.losses)


def _targets(
    n: int, n_labels: int, target_probs: NDArray[np.floating], grades: NDArray[np.integer]
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = np.asarray(target_probs, dtype=np.float32)
    labels = np.asarray(grades, dtype=np.int64)
    if probs.shape != (n, n_labels):
        raise InputError(f"target_probs must have shape ({n}, {n_labels}); got {probs.shape}")
    if labels.shape != (n,):
        raise InputError(f"grades must have shape ({n},) (-1 where none); got {labels.shape}")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0:
        raise InputError("target_probs must be finite and non-negative")
    if np.any((labels < -1) | (labels >= n_labels)):
        raise InputError(f"grades must be -1 (none) or lie in [0, {n_labels})")
    return torch.from_numpy(probs), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------------
# Stage 1: linear probe


def linear_probe(
    model: PreTrainedModel,
    features: NDArray[np.floating],
    target_probs: NDArray[np.floating],
    grades: NDArray[np.integer],
    loss_fn: LossFn,
    *,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> StageResult:
    """Train only the head of ``model`` on cached head inputs ``features (N, H)``; the backbone is untouched.

    AdamW over the head's parameters, ``epochs`` passes of seeded shuffled mini-batches. No backbone
    forward runs, and no backbone parameter is handed to the optimiser, so the backbone stays bit-
    identical. The head's parameters are trained in place; ``requires_grad`` flags are restored.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError(f"epochs and batch_size must be >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    _, head = head_of(model)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"features must be a non-empty (N, H) array; got shape {tuple(x.shape)}")
    probs, labels = _targets(x.shape[0], int(model.config.num_labels), target_probs, grades)
    params = list(head.parameters())
    flags = [p.requires_grad for p in params]
    device = params[0].device
    dtype = params[0].dtype
    x = x.to(device=device, dtype=dtype)
    probs, labels = probs.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    was_training = head.training
    started = time.perf_counter()
    losses: list[float] = []
    head.train()
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], batch_size):
                idx = order[start : start + batch_size].to(device)
                loss = loss_fn(head(x[idx]).float(), probs[idx], labels[idx])
                step = len(losses) + 1
                losses.append(optimizer_step(loss, optimizer, params, None, step=step, what="linear-probe"))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        head.train(was_training)
    seconds = time.perf_counter() - started
    logger.info(
        "linear probe: %d steps in %.1f s, loss %.4f -> %.4f", len(losses), seconds, losses[0], losses[-1]
    )
    return StageResult(tuple(losses), seconds)


# --------------------------------------------------------------------------------------------------
# Stage 2: fine-tune (full or LoRA)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    target_probs: NDArray[np.floating],
    grades: NDArray[np.integer],
    loss_fn: LossFn,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_steps: int | None = None,
    grad_clip: float | None = 1.0,
    max_length: int = DEFAULT_MAX_LENGTH,
    lora: LoraSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
) -> tuple[PreTrainedModel, StageResult]:
    """Fine-tune ``model`` on ``pairs`` with ``loss_fn``; returns ``(model, result)``, model in eval mode.

    Full fine-tuning trains every parameter in place. With ``lora``, adapters (and a trainable copy
    of the head) are added through ``peft``, trained, then merged back (``merge_and_unload``), so the
    returned model is a plain transformers model again — use the returned object. Batches are
    length-bucketed and seeded; AdamW (no decay on biases and norms), linear warm-up and decay over
    the steps that run (``max_steps`` caps them: the ablation's equal budget). With
    ``checkpoint_dir`` the run checkpoints every ``checkpoint_every`` steps and resumes from the
    newest checkpoint, as :func:`darl_lite.distill.trainer.distill_student` does
    (:class:`~darl_lite.distill.train_loop.TrainLoop`).
    """
    if not pairs:
        raise InputError("finetune got no pairs")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError(f"epochs and batch_size must be >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    if max_steps is not None and max_steps < 1:
        raise InputError(f"max_steps must be None or >= 1; got {max_steps}")
    probs, labels = _targets(len(pairs), int(model.config.num_labels), target_probs, grades)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = TokenizedPairs.of(model, tokenizer, pairs, max_length)
    trained: Any = wrap_lora(model, lora) if lora is not None else model
    settings = dict(stage="finetune", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                    weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_steps=max_steps,
                    grad_clip=grad_clip, max_length=max_length,
                    lora=None if lora is None else astuple(lora))  # fmt: skip
    arrays = [probs.numpy(), labels.numpy()]
    checkpoints = Checkpoints.for_run(checkpoint_dir, settings, pairs, arrays, trained, checkpoint_every)
    loop = TrainLoop(
        trained,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        total_steps=total_steps(len(pairs), batch_size, epochs, max_steps),
        grad_clip=grad_clip,
        checkpoints=checkpoints,
        what="fine-tuning",
        progress=progress,
    )
    started = time.perf_counter()
    loop.train_on(
        data,
        batch_size,
        rng,
        lambda logits, index: loss_fn(
            logits.float(), probs[index].to(data.device), labels[index].to(data.device)
        ),
    )
    losses = loop.losses
    if lora is not None:
        trained = trained.merge_and_unload()
        trained.eval()
    seconds = time.perf_counter() - started
    logger.info(
        "fine-tune: %d steps in %.1f s, loss %.4f -> %.4f", len(losses), seconds, losses[0], losses[-1]
    )
    return trained, StageResult(tuple(losses), seconds)


# --------------------------------------------------------------------------------------------------
# Stage 3: weight interpolation (WiSE-FT)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (parameters and buffers)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def interpolate_weights(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``θ(α) = (1 − α) · θ_start + α · θ_end`` for every floating-point tensor (WiSE-FT).

    Integer buffers (e.g. position ids) must agree and are copied. Both state dicts must hold the
    same names and shapes; a mismatch is an :class:`InputError` naming the first offender.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1]; got {alpha}")
    if set(start) != set(end):
        raise InputError(f"state dicts differ in names, e.g. {sorted(set(start) ^ set(end))[:3]}")
    out: dict[str, torch.Tensor] = {}
    for name, a in start.items():
        b = end[name]
        if a.shape != b.shape:
            raise InputError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            out[name] = torch.lerp(a, b.to(a.dtype), alpha) if 0.0 < alpha < 1.0 else (a if alpha == 0 else b)
        else:
            if not torch.equal(a, b):
                raise InputError(f"{name}: non-floating tensors differ between the two models")
            out[name] = a
    return out


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place (strict: every name must match)."""
    model.load_state_dict(dict(state), strict=True)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dev_sets: Mapping[str, Sequence[Pair]],
    *,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, dict[str, float]]:
    """``{name: grading_report}`` (macro-F1, accuracy, NDCG@10, ECE) on each graded dev set."""
    out: dict[str, dict[str, float]] = {}
    for name, pairs in dev_sets.items():
        logits = predict_logits(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
        out[name] = grading_report(softmax(logits), pairs)
    return out


def mean_macro_f1(reports: Mapping[str, Mapping[str, float]]) -> float:
    """The default WiSE-FT objective: macro-F1 averaged over the dev sets (e.g. ID dev and OOD dev)."""
    if not reports:
        raise InputError("the interpolation objective needs at least one dev set")
    return float(np.mean([report["macro_f1"] for report in reports.values()]))


@dataclass(frozen=True)
class InterpolationResult:
    """The chosen ``alpha``, and ``(alpha, objective, {dev set: report})`` for every grid value."""

    alpha: float
    objective: float
    curve: tuple[tuple[float, float, dict[str, dict[str, float]]], ...]


def choose_interpolation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    dev_sets: Mapping[str, Sequence[Pair]],
    *,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    objective: Objective = mean_macro_f1,
    batch_size: int = 64,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> InterpolationResult:
    """Evaluate ``θ(α)`` for each ``α`` of ``grid`` on ``dev_sets``, load the best into ``model``.

    Best = the highest ``objective`` (default :func:`mean_macro_f1`); on a tie the first in grid
    order wins (with an ascending grid, the one nearer the probed model).
    """
    if not grid:
        raise InputError("grid must hold at least one alpha")
    if not dev_sets or any(len(pairs) == 0 for pairs in dev_sets.values()):
        raise InputError("choosing alpha needs at least one non-empty dev set")
    curve: list[tuple[float, float, dict[str, dict[str, float]]]] = []
    for alpha in grid:
        load_weights(model, interpolate_weights(start, end, float(alpha)))
        reports = evaluate(model, tokenizer, dev_sets, batch_size=batch_size, max_length=max_length)
        curve.append((float(alpha), float(objective(reports)), reports))
        logger.info("WiSE-FT alpha %.2f: objective %.4f", alpha, curve[-1][1])
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    alpha, value, _ = curve[best]
    load_weights(model, interpolate_weights(start, end, alpha))
    return InterpolationResult(alpha=alpha, objective=value, curve=tuple(curve))
