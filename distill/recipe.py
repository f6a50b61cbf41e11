"""The DaRL recipe end to end: graded loss, DASA augmentation and the three stages, one call.

:func:`run_recipe` runs, in order:

0. targets: the teacher's probabilities where given, else one-hot human grades;
1. features of the training pairs from the frozen backbone, once (stage 1 and DASA share them);
2. augmentation (optional): ``"dasa"`` (:func:`darl_lite.distill.dasa.select_augmentation` on those
   features) or ``"random"`` (same size, same per-query cap), labelled by ``labeler`` (default: the
   pool's own human grades, which nothing reads before selection);
3. stage 1 linear probe, stage 2 fine-tune, stage 3 WiSE-FT interpolation — whichever
   ``RecipeConfig.stages`` names, in that order;

and returns the dev metrics after every stage. The model is trained in place (with LoRA, use
``RecipeResult.model``: the merged model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.distill.backbone import DEFAULT_MAX_LENGTH
from darl_lite.distill.dasa import (
    Labeler,
    SelectionResult,
    human_labeler,
    label_selection,
    random_selection,
    select_augmentation,
)
from darl_lite.distill.graded_loss import (
    DEFAULT_MARGIN,
    ConfidenceKind,
    OrdinalKind,
    graded_distillation_loss,
)
from darl_lite.distill.losses import distillation_loss
from darl_lite.distill.stages import (
    DEFAULT_ALPHA_GRID,
    InterpolationResult,
    LoraSettings,
    LossFn,
    StageResult,
    choose_interpolation,
    evaluate,
    extract_features,
    finetune,
    linear_probe,
    snapshot,
)
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

LossName = Literal["ce", "graded"]
Augmentation = Literal["random", "dasa"]
STAGES: tuple[str, ...] = ("probe", "finetune", "interpolate")


@dataclass(frozen=True)
class RecipeConfig:
    """Every knob of :func:`run_recipe`; invalid values raise :class:`InputError` at once.

    ``loss``: ``"ce"`` is :func:`~darl_lite.distill.losses.distillation_loss` (KL to the teacher at
    ``temperature`` + CE on human grades, weighted by ``alpha``); ``"graded"`` is
    :func:`~darl_lite.distill.graded_loss.graded_distillation_loss` (the same plus the ordinal and
    over-confidence terms). ``stages``: a subsequence of ``("probe", "finetune", "interpolate")``;
    ``("finetune",)`` is the single-stage baseline. ``augment_in``: which stages see the augmented
    samples. ``finetune_max_steps`` fixes stage 2's optimiser steps (equal budget across arms).
    """

    loss: LossName = "graded"
    alpha: float = 0.5
    temperature: float = 2.0
    ordinal_weight: float = 0.5
    confidence_weight: float = 0.1
    confidence_kind: ConfidenceKind = "margin"
    ordinal: OrdinalKind = "emd"
    margin: float = DEFAULT_MARGIN
    stages: tuple[str, ...] = STAGES
    probe_epochs: int = 20
    probe_lr: float = 1e-2
    probe_batch_size: int = 256
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    finetune_max_steps: int | None = None
    grad_clip: float | None = 1.0
    max_length: int = DEFAULT_MAX_LENGTH
    lora: LoraSettings | None = None
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    augment_budget: int = 0
    augment_in: Literal["probe", "finetune", "both"] = "both"
    dasa_k: int = 10
    per_query_cap: int | None = None
    candidate_factor: int = 4
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        positions = [STAGES.index(s) if s in STAGES else -1 for s in self.stages]
        checks: list[tuple[bool, str]] = [
            (self.loss in ("ce", "graded"), f"loss must be 'ce' or 'graded'; got {self.loss!r}"),
            (0 <= self.alpha <= 1, f"alpha must lie in [0, 1]; got {self.alpha}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (
                bool(self.stages) and -1 not in positions and positions == sorted(set(positions)),
                f"stages must be a non-empty ordered subsequence of {STAGES}; got {self.stages}",
            ),
            (
                "interpolate" not in self.stages or "finetune" in self.stages,
                "stage 'interpolate' needs stage 'finetune'",
            ),
            (self.probe_epochs >= 1 and self.epochs >= 1, "probe_epochs and epochs must be >= 1"),
            (self.probe_lr > 0 and self.lr > 0, "probe_lr and lr must be > 0"),
            (self.batch_size >= 1 and self.probe_batch_size >= 1, "batch sizes must be >= 1"),
            (
                self.finetune_max_steps is None or self.finetune_max_steps >= 1,
                f"finetune_max_steps must be None or >= 1; got {self.finetune_max_steps}",
            ),
            (
                all(0 <= a <= 1 for a in self.alpha_grid) and bool(self.alpha_grid),
                "alpha_grid values in [0, 1]",
            ),
            (self.augment_budget >= 0, f"augment_budget must be >= 0; got {self.augment_budget}"),
            (self.augment_in in ("probe", "finetune", "both"), f"bad augment_in {self.augment_in!r}"),
            (self.max_length >= 8, f"max_length must be >= 8; got {self.max_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"RecipeConfig: {message}")

    def loss_fn(self) -> LossFn:
        """``(logits, target_probs, grades) -> loss`` for this configuration."""
        if self.loss == "ce":

            def ce(logits: torch.Tensor, probs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
                return distillation_loss(
                    logits, probs, grades, temperature=self.temperature, alpha=self.alpha
                )

            return ce

        def graded(logits: torch.Tensor, probs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
            return graded_distillation_loss(
                logits,
                probs,
                grades,
                alpha=self.alpha,
                temperature=self.temperature,
                ordinal_weight=self.ordinal_weight,
                confidence_weight=self.confidence_weight,
                kind=self.confidence_kind,
                ordinal=self.ordinal,
                margin=self.margin,
            )

        return graded


@dataclass
class RecipeResult:
    """What :func:`run_recipe` did. ``metrics[stage][dev set]`` is a grading report after that stage."""

    model: PreTrainedModel
    metrics: dict[str, dict[str, dict[str, float]]]
    stage_results: dict[str, StageResult]
    interpolation: InterpolationResult | None = None
    selection: SelectionResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Plain, JSON-ready values: metrics, chosen alpha, steps, seconds, selection size."""
        return {
            "metrics": self.metrics,
            "alpha": None if self.interpolation is None else self.interpolation.alpha,
            "alpha_curve": None
            if self.interpolation is None
            else [(a, obj) for a, obj, _ in self.interpolation.curve],
            "steps": {name: r.steps for name, r in self.stage_results.items()},
            "final_loss": {name: r.losses[-1] for name, r in self.stage_results.items() if r.losses},
            "seconds": self.seconds,
            "augmentation": None
            if self.selection is None
            else {"method": self.selection.method, "size": len(self.selection)},
        }


def _train_targets(
    pairs: Sequence[Pair], teacher_probs: NDArray[np.floating] | None, n_labels: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    grades = np.asarray([-1 if p.grade is None else p.grade for p in pairs], dtype=np.int64)
    if teacher_probs is not None:
        probs = np.asarray(teacher_probs, dtype=np.float32)
        if probs.shape != (len(pairs), n_labels):
            raise InputError(
                f"teacher_probs must have shape ({len(pairs)}, {n_labels}) to match train_pairs; "
                f"got {probs.shape}"
            )
        return probs, grades
    missing = np.flatnonzero(grades < 0)
    if missing.size:
        raise InputError(
            f"without teacher_probs every training pair needs a human grade; "
            f"train_pairs[{int(missing[0])}] has none"
        )
    return np.eye(n_labels, dtype=np.float32)[grades], grades


def _grades_of(probs: NDArray[np.float32]) -> NDArray[np.int64]:
    """A hard grade for rows that are exactly one-hot (human labels), -1 for soft (teacher) rows."""
    one_hot = np.isclose(probs.max(axis=1), 1.0)
    return np.where(one_hot, probs.argmax(axis=1), -1).astype(np.int64)


def run_recipe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: Sequence[Pair],
    dev_sets: Mapping[str, Sequence[Pair]],
    *,
    config: RecipeConfig | None = None,
    teacher_probs: NDArray[np.floating] | None = None,
    augmentation: Augmentation | None = None,
    pool: Sequence[Pair] | None = None,
    labeler: Labeler | None = None,
    progress: bool = False,
) -> RecipeResult:
    """Run the configured stages on ``train_pairs`` and report ``dev_sets`` metrics after each.

    ``teacher_probs (N, C)`` are the soft targets (else one-hot human grades, and every train pair
    must be graded). ``augmentation`` (``None``, ``"random"``, ``"dasa"``) adds
    ``config.augment_budget`` samples of ``pool`` labelled by ``labeler`` (default: the pool's human
    grades; a labeler returning one-hot rows gives hard grades too, soft rows are soft targets only).
    The pool's grades are never read before selection.
    """
    cfg = config or RecipeConfig()
    if not train_pairs:
        raise InputError("run_recipe got no training pairs")
    if augmentation not in (None, "random", "dasa"):
        raise InputError(f"augmentation must be None, 'random' or 'dasa'; got {augmentation!r}")
    if augmentation is not None and (not pool or cfg.augment_budget < 1):
        raise InputError(
            f"augmentation {augmentation!r} needs a non-empty pool and config.augment_budget >= 1"
        )
    if "interpolate" in cfg.stages and not dev_sets:
        raise InputError("stage 'interpolate' chooses alpha on dev sets; pass at least one")
    n_labels = int(model.config.num_labels)
    probs, grades = _train_targets(train_pairs, teacher_probs, n_labels)
    loss_fn = cfg.loss_fn()
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    stage_results: dict[str, StageResult] = {}
    feature_kw: dict[str, Any] = {"batch_size": cfg.eval_batch_size, "max_length": cfg.max_length}
    eval_kw: dict[str, Any] = {"batch_size": cfg.eval_batch_size, "max_length": cfg.max_length}

    train_features: NDArray[np.float32] | None = None
    if "probe" in cfg.stages or augmentation == "dasa":
        started = time.perf_counter()
        train_features, _ = extract_features(model, tokenizer, train_pairs, progress=progress, **feature_kw)
        seconds["features"] = time.perf_counter() - started

    # Augmentation: choose from the pool without reading its grades, then label the chosen.
    selection: SelectionResult | None = None
    aug_pairs: list[Pair] = []
    aug_probs = np.zeros((0, n_labels), dtype=np.float32)
    aug_features: NDArray[np.float32] | None = None
    if augmentation is not None:
        assert pool is not None
        started = time.perf_counter()
        budget = min(cfg.augment_budget, len(pool))
        query_ids = [p.query_id if p.query_id is not None else p.query for p in pool]
        if augmentation == "dasa":
            assert train_features is not None
            blind = [Pair(p.query, p.item) for p in pool]
            pool_features, _ = extract_features(model, tokenizer, blind, progress=progress, **feature_kw)
            selection = select_augmentation(
                train_features,
                np.where(grades >= 0, grades, probs.argmax(axis=1)),  # human grade, else teacher's
                pool_features,
                query_ids,
                budget,
                k=min(cfg.dasa_k, len(train_pairs)),
                per_query_cap=cfg.per_query_cap,
                candidate_factor=cfg.candidate_factor,
                seed=cfg.seed,
            )
            aug_features = pool_features[list(selection.indices)]
        else:
            selection = random_selection(
                len(pool), budget, pool_query_ids=query_ids, per_query_cap=cfg.per_query_cap, seed=cfg.seed
            )
        aug_pairs, aug_probs = label_selection(pool, selection, labeler or human_labeler)
        if aug_pairs and aug_probs.shape[1] != n_labels:
            raise InputError(f"the labeler returned {aug_probs.shape[1]} grades; the model has {n_labels}")
        seconds["augmentation"] = time.perf_counter() - started
        logger.info("augmentation %s: %d pool samples", augmentation, len(aug_pairs))
    aug_grades = _grades_of(aug_probs) if len(aug_pairs) else np.zeros(0, dtype=np.int64)
    augment_probe = bool(aug_pairs) and cfg.augment_in in ("probe", "both")
    augment_finetune = bool(aug_pairs) and cfg.augment_in in ("finetune", "both")

    if "probe" in cfg.stages:
        assert train_features is not None
        x, p, y = train_features, probs, grades
        if augment_probe:
            if aug_features is None:
                aug_features, _ = extract_features(model, tokenizer, aug_pairs, **feature_kw)
            x = np.concatenate([x, aug_features])
            p, y = np.concatenate([p, aug_probs]), np.concatenate([y, aug_grades])
        result = linear_probe(
            model,
            x,
            p,
            y,
            loss_fn,
            epochs=cfg.probe_epochs,
            lr=cfg.probe_lr,
            batch_size=cfg.probe_batch_size,
            seed=cfg.seed,
        )
        stage_results["probe"] = result
        seconds["probe"] = result.seconds
        if dev_sets:
            metrics["probe"] = evaluate(model, tokenizer, dev_sets, **eval_kw)

    interpolation: InterpolationResult | None = None
    if "finetune" in cfg.stages:
        start_state = snapshot(model) if "interpolate" in cfg.stages else None
        pairs = [*train_pairs, *aug_pairs] if augment_finetune else list(train_pairs)
        p = np.concatenate([probs, aug_probs]) if augment_finetune else probs
        y = np.concatenate([grades, aug_grades]) if augment_finetune else grades
        model, result = finetune(
            model,
            tokenizer,
            pairs,
            p,
            y,
            loss_fn,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            max_steps=cfg.finetune_max_steps,
            grad_clip=cfg.grad_clip,
            max_length=cfg.max_length,
            lora=cfg.lora,
            seed=cfg.seed,
            progress=progress,
        )
        stage_results["finetune"] = result
        seconds["finetune"] = result.seconds
        if dev_sets:
            metrics["finetune"] = evaluate(model, tokenizer, dev_sets, **eval_kw)

        if start_state is not None:
            started = time.perf_counter()
            interpolation = choose_interpolation(
                model, tokenizer, start_state, snapshot(model), dev_sets, grid=cfg.alpha_grid, **eval_kw
            )
            seconds["interpolate"] = time.perf_counter() - started
            metrics["interpolate"] = next(r for a, _, r in interpolation.curve if a == interpolation.alpha)
    return RecipeResult(
        model=model,
        metrics=metrics,
        stage_results=stage_results,
        interpolation=interpolation,
        selection=selection,
        seconds=seconds,
    )
