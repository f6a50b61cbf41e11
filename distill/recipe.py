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
    _check_run(cfg, train_pairs, dev_sets, augmentation, pool)
    run = _Run(model, tokenizer, cfg, dev_sets, progress)
    probs, grades = _train_targets(train_pairs, teacher_probs, run.n_labels)
    train = _Targets(list(train_pairs), probs, grades)
    if "probe" in cfg.stages or augmentation == "dasa":
        started = time.perf_counter()
        train.features, _ = extract_features(model, tokenizer, train_pairs, progress=progress, **run.kw)
        run.seconds["features"] = time.perf_counter() - started
    selection, aug = None, _Targets([], np.zeros((0, run.n_labels), np.float32), np.zeros(0, np.int64))
    if augmentation is not None:
        assert pool is not None
        selection, aug = _augment(run, augmentation, pool, labeler or human_labeler, train)
    loss_fn = cfg.loss_fn()
    if "probe" in cfg.stages:
        _probe_stage(run, train, aug if aug.pairs and cfg.augment_in in ("probe", "both") else None, loss_fn)
    interpolation: InterpolationResult | None = None
    if "finetune" in cfg.stages:
        with_aug = bool(aug.pairs) and cfg.augment_in in ("finetune", "both")
        interpolation = _finetune_stage(run, train.joined(aug) if with_aug else train, loss_fn)
    return RecipeResult(
        model=run.model,
        metrics=run.metrics,
        stage_results=run.stage_results,
        interpolation=interpolation,
        selection=selection,
        seconds=run.seconds,
    )


def _check_run(
    cfg: RecipeConfig,
    train_pairs: Sequence[Pair],
    dev_sets: Mapping[str, Sequence[Pair]],
    augmentation: Augmentation | None,
    pool: Sequence[Pair] | None,
) -> None:
    """:class:`InputError` for a run :func:`run_recipe` cannot do, before any work."""
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


@dataclass
class _Targets:
    """Pairs with their soft targets, hard grades (-1 = none) and, once extracted, head features."""

    pairs: list[Pair]
    probs: NDArray[np.float32]
    grades: NDArray[np.int64]
    features: NDArray[np.float32] | None = None

    def joined(self, other: _Targets) -> _Targets:
        """These rows, then ``other``'s (features dropped: the caller extracts what it needs)."""
        return _Targets(
            [*self.pairs, *other.pairs],
            np.concatenate([self.probs, other.probs]),
            np.concatenate([self.grades, other.grades]),
        )


@dataclass
class _Run:
    """One :func:`run_recipe` call's model (replaced by a LoRA merge), settings and what it recorded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: RecipeConfig
    dev_sets: Mapping[str, Sequence[Pair]]
    progress: bool
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    stage_results: dict[str, StageResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def kw(self) -> dict[str, Any]:
        """Batch size and max length of feature extraction and evaluation."""
        return {"batch_size": self.cfg.eval_batch_size, "max_length": self.cfg.max_length}

    def record(self, stage: str, result: StageResult) -> None:
        """Keep a stage's result and time, and the dev metrics after it."""
        self.stage_results[stage] = result
        self.seconds[stage] = result.seconds
        if self.dev_sets:
            self.metrics[stage] = evaluate(self.model, self.tokenizer, self.dev_sets, **self.kw)


def _augment(
    run: _Run, augmentation: Augmentation, pool: Sequence[Pair], labeler: Labeler, train: _Targets
) -> tuple[SelectionResult, _Targets]:
    """Choose from ``pool`` without reading its grades (DASA on features, or at random), then label."""
    cfg = run.cfg
    started = time.perf_counter()
    budget = min(cfg.augment_budget, len(pool))
    query_ids = [p.query_id if p.query_id is not None else p.query for p in pool]
    features: NDArray[np.float32] | None = None
    if augmentation == "dasa":
        assert train.features is not None
        blind = [Pair(p.query, p.item) for p in pool]
        pool_features, _ = extract_features(run.model, run.tokenizer, blind, progress=run.progress, **run.kw)
        selection = select_augmentation(
            train.features,
            np.where(train.grades >= 0, train.grades, train.probs.argmax(axis=1)),  # human, else teacher
            pool_features,
            query_ids,
            budget,
            k=min(cfg.dasa_k, len(train.pairs)),
            per_query_cap=cfg.per_query_cap,
            candidate_factor=cfg.candidate_factor,
            seed=cfg.seed,
        )
        features = pool_features[list(selection.indices)]
    else:
        selection = random_selection(
            len(pool), budget, pool_query_ids=query_ids, per_query_cap=cfg.per_query_cap, seed=cfg.seed
        )
    pairs, probs = label_selection(pool, selection, labeler)
    if pairs and probs.shape[1] != run.n_labels:
        raise InputError(f"the labeler returned {probs.shape[1]} grades; the model has {run.n_labels}")
    run.seconds["augmentation"] = time.perf_counter() - started
    logger.info("augmentation %s: %d pool samples", augmentation, len(pairs))
    grades = _grades_of(probs) if len(pairs) else np.zeros(0, dtype=np.int64)
    return selection, _Targets(pairs, probs, grades, features)


def _probe_stage(run: _Run, train: _Targets, aug: _Targets | None, loss_fn: LossFn) -> None:
    """Stage 1 on the training features (and the augmentation's, when it goes into the probe)."""
    assert train.features is not None
    x, p, y = train.features, train.probs, train.grades
    if aug is not None:
        if aug.features is None:
            aug.features, _ = extract_features(run.model, run.tokenizer, aug.pairs, **run.kw)
        x = np.concatenate([x, aug.features])
        p, y = np.concatenate([p, aug.probs]), np.concatenate([y, aug.grades])
    cfg = run.cfg
    result = linear_probe(
        run.model,
        x,
        p,
        y,
        loss_fn,
        epochs=cfg.probe_epochs,
        lr=cfg.probe_lr,
        batch_size=cfg.probe_batch_size,
        seed=cfg.seed,
    )
    run.record("probe", result)


def _finetune_stage(run: _Run, data: _Targets, loss_fn: LossFn) -> InterpolationResult | None:
    """Stage 2 on ``data``, then stage 3 (WiSE-FT between before and after) when configured."""
    cfg = run.cfg
    start_state = snapshot(run.model) if "interpolate" in cfg.stages else None
    run.model, result = finetune(
        run.model,
        run.tokenizer,
        data.pairs,
        data.probs,
        data.grades,
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
        progress=run.progress,
    )
    run.record("finetune", result)
    if start_state is None:
        return None
    started = time.perf_counter()
    interpolation = choose_interpolation(
        run.model,
        run.tokenizer,
        start_state,
        snapshot(run.model),
        run.dev_sets,
        grid=cfg.alpha_grid,
        **run.kw,
    )
    run.seconds["interpolate"] = time.perf_counter() - started
    run.metrics["interpolate"] = next(r for a, _, r in interpolation.curve if a == interpolation.alpha)
    return interpolation
