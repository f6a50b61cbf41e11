"""Tune the LLM teacher with the DaRL recipe's CPU stage, then grade every pair with it.

On a CPU the recipe's first stage is what fits: a **linear probe** (backbone frozen) on the LLM's
cached last-token hidden states (:mod:`darl_lite.distill.llm_features`), trained with the **graded
loss** on human grades, plus **DASA** samples from the out-of-distribution pool chosen on the LLM's
own representation and labelled with their (until then hidden) human grades. The layer the probe
reads and a temperature are chosen on the dev sets (``dev`` and ``ood_dev``); test splits are only
scored. Stages 2–3 (LoRA fine-tune, weight interpolation) need backpropagation through the LLM and
are for a GPU (:mod:`darl_lite.distill.recipe`).

The tuned teacher is the LLM plus a :class:`ProbeHead` (a few KB, ``.npz``): :class:`ProbeTeacher`
grades new pairs with it, and :func:`tune_teacher` also runs the recipe's ablation on the probe
(plain CE vs graded loss; no augmentation vs random vs DASA of equal size), which costs seconds once
the features are cached.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from darl_lite.calibration import fit_temperature
from darl_lite.datasets import Splits
from darl_lite.distill.dasa import random_selection, select_augmentation
from darl_lite.distill.graded_loss import graded_loss
from darl_lite.errors import InputError
from darl_lite.metrics import grading_report
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

N_GRADES = 3
_HEAD_HINT = "pass the .npz head that `darl-lite distill teacher` wrote (e.g. teacher_llm_head.npz)"
Augmentation = Literal["none", "random", "dasa"]
#: Arms of the probe ablation: name -> (loss, augmentation).
PROBE_ARMS: dict[str, tuple[str, Augmentation]] = {
    "ce-none": ("ce", "none"),
    "graded-none": ("graded", "none"),
    "graded-random": ("graded", "random"),
    "graded-dasa": ("graded", "dasa"),
}


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe is trained; one config per ablation arm."""

    loss: Literal["ce", "graded"] = "graded"
    augmentation: Augmentation = "dasa"
    augment_budget: int = 2000
    per_query_cap: int | None = 60
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-3
    ordinal_weight: float = 0.5
    confidence_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "graded"):
            raise InputError(f"loss must be 'ce' or 'graded'; got {self.loss!r}")
        if self.augmentation not in ("none", "random", "dasa"):
            raise InputError(f"augmentation must be 'none', 'random' or 'dasa'; got {self.augmentation!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.augment_budget < 0:
            raise InputError("epochs and batch_size must be >= 1 and augment_budget >= 0")


@dataclass(frozen=True)
class ProbeHead:
    """``softmax((standardise(h_layer) · Wᵀ + b) / T)``: the tuned teacher's grading head."""

    layer: int
    mean: NDArray[np.float32]
    scale: NDArray[np.float32]
    weight: NDArray[np.float32]  # (C, H)
    bias: NDArray[np.float32]  # (C,)
    temperature: float = 1.0

    def logits(self, features: NDArray[np.floating]) -> NDArray[np.float32]:
        x = (np.asarray(features, np.float32) - self.mean) / self.scale
        return ((x @ self.weight.T + self.bias) / self.temperature).astype(np.float32)

    def predict_proba(self, features: NDArray[np.floating]) -> NDArray[np.float32]:
        z = self.logits(features)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the head as a plain ``.npz`` (no pickle), atomically."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp.npz")
        np.savez(
            tmp,
            layer=np.int64(self.layer),
            mean=self.mean,
            scale=self.scale,
            weight=self.weight,
            bias=self.bias,
            temperature=np.float64(self.temperature),
        )
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProbeHead:
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path} is not a probe head file: {exc}; {_HEAD_HINT}") from exc
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path} is not a probe head file: expected an .npz archive; {_HEAD_HINT}")
        try:
            with data:
                return cls(
                    layer=int(data["layer"]),
                    mean=data["mean"].astype(np.float32),
                    scale=data["scale"].astype(np.float32),
                    weight=data["weight"].astype(np.float32),
                    bias=data["bias"].astype(np.float32),
                    temperature=float(data["temperature"]),
                )
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path} is not a probe head file: {exc}; {_HEAD_HINT}") from exc


def _standardiser(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    mean = x.mean(axis=0).astype(np.float32)
    scale = (x.std(axis=0) + 1e-6).astype(np.float32)
    return mean, scale


def train_probe(
    features: NDArray[np.float32], grades: NDArray[np.int64], config: ProbeConfig, layer: int = -1
) -> ProbeHead:
    """Fit a linear head on frozen features with the configured loss (AdamW, seeded, minibatches)."""
    features = np.asarray(features, dtype=np.float32)
    if len(features) != len(grades) or len(features) == 0:
        raise InputError(f"need as many grades as feature rows (> 0); got {len(grades)} and {len(features)}")
    mean, scale = _standardiser(features)
    x = torch.from_numpy((features - mean) / scale)
    y = torch.from_numpy(np.asarray(grades, np.int64))
    generator = torch.Generator().manual_seed(config.seed)
    head = torch.nn.Linear(x.shape[1], N_GRADES)
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
        head.bias.zero_()
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = head(x[idx])
            if config.loss == "ce":
                loss = torch.nn.functional.cross_entropy(logits, y[idx])
            else:
                loss = graded_loss(
                    logits,
                    y[idx],
                    ordinal_weight=config.ordinal_weight,
                    confidence_weight=config.confidence_weight,
                )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return ProbeHead(
        layer=layer,
        mean=mean,
        scale=scale,
        weight=head.weight.detach().numpy().astype(np.float32),
        bias=head.bias.detach().numpy().astype(np.float32),
    )


@dataclass(frozen=True)
class FeatureTable:
    """Cached features of every distinct pair, by layer, and where each split's pairs sit in it."""

    features: Mapping[int, NDArray[np.float32]]
    row_of: Mapping[tuple[str, str], int]

    @classmethod
    def build(cls, features: Mapping[int, NDArray[np.float32]], pairs: Sequence[Pair]) -> FeatureTable:
        n = {len(v) for v in features.values()}
        if n != {len(pairs)}:
            raise InputError(
                f"features have {sorted(n)} rows but there are {len(pairs)} pairs; pass the pairs the "
                "features were cached for, in the same order (llm_features.distinct_pairs)"
            )
        return cls(features, {pair.key: i for i, pair in enumerate(pairs)})

    def rows(self, pairs: Sequence[Pair]) -> NDArray[np.int64]:
        missing = [p for p in pairs if p.key not in self.row_of]
        if missing:
            raise InputError(
                f"{len(missing)} pairs have no cached features, e.g. {missing[0].key!r}; cache features "
                "for every pair of the splits (llm_features.cache_features over distinct_pairs(splits))"
            )
        return np.fromiter((self.row_of[p.key] for p in pairs), np.int64, len(pairs))

    def of(self, layer: int, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        return self.features[layer][self.rows(pairs)]


@dataclass(frozen=True)
class TunedProbe:
    """One tuned head with what chose it and how it scores on every split."""

    head: ProbeHead
    config: ProbeConfig
    dev_by_layer: dict[int, float]
    augmented: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _grades(pairs: Sequence[Pair]) -> NDArray[np.int64]:
    return np.asarray([p.grade for p in pairs], np.int64)


def _augmentation(table: FeatureTable, layer: int, splits: Splits, config: ProbeConfig) -> list[Pair]:
    if config.augmentation == "none" or config.augment_budget == 0:
        return []
    pool = list(splits.ood_train)
    pool_ids = [p.query_id or p.query for p in pool]
    budget = min(config.augment_budget, len(pool))
    if config.augmentation == "random":
        chosen = random_selection(
            len(pool), budget, pool_query_ids=pool_ids, per_query_cap=config.per_query_cap, seed=config.seed
        )
    else:
        train = list(splits.train)
        x_train = table.of(layer, train)
        mean, scale = _standardiser(x_train)
        chosen = select_augmentation(
            (x_train - mean) / scale,
            _grades(train),
            (table.of(layer, pool) - mean) / scale,
            pool_ids,
            budget,
            per_query_cap=config.per_query_cap,
            seed=config.seed,
        )
    # Only now are the chosen pool pairs' human grades read (the labeler of the shipped data).
    return [pool[i] for i in chosen.indices]


def augmentation_pairs(table: FeatureTable, layer: int, splits: Splits, config: ProbeConfig) -> list[Pair]:
    """The pool pairs ``config.augmentation`` adds at ``layer`` (what stage 1 trains on beyond train)."""
    return _augmentation(table, layer, splits, config)


def _fit_at_layer(
    table: FeatureTable, layer: int, splits: Splits, config: ProbeConfig
) -> tuple[ProbeHead, int]:
    extra = _augmentation(table, layer, splits, config)
    train = [*splits.train, *extra]
    head = train_probe(table.of(layer, train), _grades(train), config, layer=layer)
    dev = [*splits.dev, *splits.ood_dev]
    temperature = fit_temperature(head.logits(table.of(layer, dev)), _grades(dev))
    return replace(head, temperature=temperature), len(extra)


def _dev_score(head: ProbeHead, table: FeatureTable, splits: Splits) -> float:
    """Mean macro-F1 of ``dev`` and ``ood_dev``: both distributions count equally."""
    scores = [
        grading_report(head.predict_proba(table.of(head.layer, pairs)), list(pairs))["macro_f1"]
        for pairs in (splits.dev, splits.ood_dev)
    ]
    return float(np.mean(scores))


def tune_probe(table: FeatureTable, splits: Splits, config: ProbeConfig) -> TunedProbe:
    """Fit the probe at every cached layer; keep the layer with the best mean dev macro-F1."""
    started = time.perf_counter()
    fitted: dict[int, tuple[ProbeHead, int]] = {}
    dev_by_layer: dict[int, float] = {}
    for layer in sorted(table.features):
        fitted[layer] = _fit_at_layer(table, layer, splits, config)
        dev_by_layer[layer] = _dev_score(fitted[layer][0], table, splits)
        logger.info(
            "probe %s/%s layer %d: dev macro-F1 %.4f",
            config.loss,
            config.augmentation,
            layer,
            dev_by_layer[layer],
        )
    best = max(dev_by_layer, key=lambda layer: (dev_by_layer[layer], layer))
    head, augmented = fitted[best]
    metrics = {
        name: grading_report(head.predict_proba(table.of(head.layer, pairs)), list(pairs))
        for name in ("dev", "ood_dev", "id_test", "ood_test")
        for pairs in [splits.split(name)]
    }
    return TunedProbe(head, config, dev_by_layer, augmented, metrics, round(time.perf_counter() - started, 1))


def probe_ablation(table: FeatureTable, splits: Splits, base: ProbeConfig) -> dict[str, TunedProbe]:
    """Every :data:`PROBE_ARMS` arm with the same data, budget, epochs and selection procedure."""
    return {
        arm: tune_probe(table, splits, replace(base, loss=loss, augmentation=augmentation))  # type: ignore[arg-type]
        for arm, (loss, augmentation) in PROBE_ARMS.items()
    }


def ablation_markdown(arms: Mapping[str, TunedProbe]) -> str:
    """The probe ablation as a markdown table (test metrics, chosen layer, augmented pairs)."""
    lines = [
        "| arm | layer | augmented | id_test macro-F1 | id_test NDCG@10 | id_test ECE "
        "| ood_test macro-F1 | ood_test NDCG@10 | ood_test ECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, tuned in arms.items():
        i, o = tuned.metrics["id_test"], tuned.metrics["ood_test"]
        lines.append(
            f"| {arm} | {tuned.head.layer} | {tuned.augmented} | {i['macro_f1']:.3f} | {i['ndcg@10']:.3f} "
            f"| {i['ece']:.3f} | {o['macro_f1']:.3f} | {o['ndcg@10']:.3f} | {o['ece']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def summary(tuned: TunedProbe) -> dict[str, Any]:
    """JSON-ready description of a tuned probe (for provenance and reports)."""
    return {
        "layer": tuned.head.layer,
        "temperature": tuned.head.temperature,
        "config": asdict(tuned.config),
        "dev_macro_f1_by_layer": {str(k): round(v, 4) for k, v in tuned.dev_by_layer.items()},
        "augmented_pairs": tuned.augmented,
        "metrics": tuned.metrics,
        "seconds": tuned.seconds,
    }
