"""The recipe's stage-1 ablation on the teacher's cached features, with seeds: loss and pool selection.

Why at stage 1: once the probe-layer features are cached a probe costs seconds, so every arm can
run with several seeds and a difference can be set against its spread. Arms (all add the same
number of ``ood_train`` pairs, labelled by their human grades, read only after selection):

* ``ce-none`` / ``graded-none``: plain cross-entropy vs the graded loss, no pool pairs;
* ``graded-random``: a random draw (same per-query cap): the control of every selection arm;
* ``graded-dasa``: DASA's default, the *extreme tail* (best combined OOD score, diverse);
* ``graded-band``: the *mid-to-high band* — a random draw from the pool rows whose combined DASA
  score lies between the 50th and 90th percentile (the literature's warning: the most extreme OOD
  samples are often unlearnable outliers);
* ``graded-mix``: half DASA, half random;
* ``graded-typical``: typicality per cluster (TypiClust-like, Hacohen et al., 2022): k-means of the
  upper half by OOD score into ``budget`` clusters, the member nearest each centroid.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import fit_temperature
from darl_lite.datasets import Splits
from darl_lite.distill.dasa import detector_scores, l2_normalise, random_selection, select_augmentation
from darl_lite.distill.llm_teacher import FeatureTable, ProbeConfig, train_probe
from darl_lite.metrics import grading_report
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

ARMS: dict[str, tuple[str, str]] = {
    "ce-none": ("ce", "none"),
    "graded-none": ("graded", "none"),
    "graded-random": ("graded", "random"),
    "graded-dasa": ("graded", "dasa"),
    "graded-band": ("graded", "band"),
    "graded-mix": ("graded", "mix"),
    "graded-typical": ("graded", "typical"),
}
SPLITS = ("dev", "ood_dev", "id_test", "ood_test")


def _capped(
    candidates: Sequence[int],
    keys: Sequence[Any],
    budget: int,
    cap: int | None,
    taken: dict[Any, int] | None = None,
) -> list[int]:
    """The first ``budget`` candidates whose query has fewer than ``cap`` picks."""
    taken = {} if taken is None else taken
    chosen: list[int] = []
    for i in candidates:
        if len(chosen) == budget:
            break
        if cap is not None and taken.get(keys[i], 0) >= cap:
            continue
        chosen.append(int(i))
        taken[keys[i]] = taken.get(keys[i], 0) + 1
    return chosen


def _kmeans_typical(x: NDArray[np.float32], k: int, seed: int, iters: int = 10) -> list[int]:
    """Rows nearest each k-means centroid (cosine on L2-normalised rows), largest clusters first."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centroids = x[rng.choice(len(x), size=k, replace=False)]
    for _ in range(iters):
        assign = np.argmax(x @ centroids.T, axis=1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
        centroids = l2_normalise(centroids)
    assign = np.argmax(x @ centroids.T, axis=1)
    sims = np.einsum("ij,ij->i", x, centroids[assign])
    sizes = np.bincount(assign, minlength=k)
    picks = []
    for c in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(assign == c)
        if len(members):
            picks.extend(members[np.argsort(-sims[members], kind="stable")].tolist())
    return picks  # every row, grouped by cluster, nearest-to-centroid first within a cluster


def _select(
    kind: str,
    table: FeatureTable,
    layer: int,
    splits: Splits,
    cfg: ProbeConfig,
    scores: NDArray[np.float64] | None,
) -> list[Pair]:
    pool, train = list(splits.ood_train), list(splits.train)
    keys = [p.query_id or p.query for p in pool]
    budget, cap, seed = min(cfg.augment_budget, len(pool)), cfg.per_query_cap, cfg.seed
    if kind == "none" or budget == 0:
        return []
    rng = np.random.default_rng(seed)
    if kind == "random":
        chosen = list(
            random_selection(len(pool), budget, pool_query_ids=keys, per_query_cap=cap, seed=seed).indices
        )
    elif kind in ("dasa", "mix"):
        x_train = table.of(layer, train)
        mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
        n = budget if kind == "dasa" else budget // 2
        dasa = select_augmentation(
            (x_train - mean) / scale,
            np.asarray([p.grade for p in train]),
            (table.of(layer, pool) - mean) / scale,
            keys,
            n,
            per_query_cap=cap,
            seed=seed,
        )
        chosen = list(dasa.indices)
        if kind == "mix":
            taken: dict[Any, int] = {}
            for i in chosen:
                taken[keys[i]] = taken.get(keys[i], 0) + 1
            picked = set(chosen)
            rest = [int(i) for i in rng.permutation(len(pool)) if int(i) not in picked]
            chosen += _capped(rest, keys, budget - len(chosen), cap, taken)
    else:
        assert scores is not None
        ranks = np.argsort(np.argsort(scores)) / max(1, len(scores) - 1)
        if kind == "band":
            band = np.flatnonzero((ranks >= 0.5) & (ranks < 0.9))
            chosen = _capped(rng.permutation(band).tolist(), keys, budget, cap)
        else:  # typical
            upper = np.flatnonzero(ranks >= 0.5)
            order = _kmeans_typical(l2_normalise(table.of(layer, [pool[i] for i in upper])), budget, seed)
            chosen = _capped([int(upper[i]) for i in order], keys, budget, cap)
    return [pool[i] for i in chosen]


def _fit_arm(
    table: FeatureTable,
    layer: int,
    splits: Splits,
    cfg: ProbeConfig,
    kind: str,
    scores: NDArray[np.float64] | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    extra = _select(kind, table, layer, splits, cfg, scores)
    train = [*splits.train, *extra]
    head = train_probe(table.of(layer, train), np.asarray([p.grade for p in train]), cfg, layer=layer)
    dev = [*splits.dev, *splits.ood_dev]
    head = replace(
        head,
        temperature=fit_temperature(head.logits(table.of(layer, dev)), np.asarray([p.grade for p in dev])),
    )
    metrics = {
        n: grading_report(head.predict_proba(table.of(layer, list(splits.split(n)))), list(splits.split(n)))
        for n in SPLITS
    }
    return {"metrics": metrics, "augmented": len(extra), "seconds": round(time.perf_counter() - started, 1)}


def run_ablation(
    table: FeatureTable,
    splits: Splits,
    layer: int,
    seeds: Sequence[int],
    base: ProbeConfig,
    out_dir: str | os.PathLike[str],
) -> dict[str, dict[str, Any]]:
    """Every arm × seed (resumable: ``ablation.json`` is rewritten after each) and ``ablation.md``."""
    out = Path(out_dir)
    path = out / "ablation.json"
    results: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    scores: NDArray[np.float64] | None = None
    for arm, (loss, kind) in ARMS.items():
        for seed in seeds:
            if str(seed) in results.get(arm, {}):
                continue
            if kind in ("band", "typical") and scores is None:
                train, pool = list(splits.train), list(splits.ood_train)
                x_train = table.of(layer, train)
                mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
                scores = detector_scores(
                    (x_train - mean) / scale,
                    np.asarray([p.grade for p in train]),
                    (table.of(layer, pool) - mean) / scale,
                )["combined"]
            cfg = replace(base, loss=loss, seed=seed)
            results.setdefault(arm, {})[str(seed)] = _fit_arm(table, layer, splits, cfg, kind, scores)
            logger.info("ablation %s seed %d done", arm, seed)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
    (out / "ablation.md").write_text(ablation_markdown(results), encoding="utf-8")
    return results


def ablation_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Mean ± sd over seeds per arm: dev score, test macro-F1 / NDCG@10 / ECE."""
    cols = [
        ("dev", "macro_f1"),
        ("ood_dev", "macro_f1"),
        ("id_test", "macro_f1"),
        ("id_test", "ndcg@10"),
        ("id_test", "ece"),
        ("ood_test", "macro_f1"),
        ("ood_test", "ndcg@10"),
        ("ood_test", "ece"),
    ]
    lines = [
        "| arm | seeds | augmented | " + " | ".join(f"{s} {m}" for s, m in cols) + " |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for arm, by_seed in results.items():
        runs = list(by_seed.values())
        cells = []
        for split, metric in cols:
            v = np.asarray([r["metrics"][split][metric] for r in runs])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}")
        lines.append(f"| {arm} | {len(runs)} | {runs[0]['augmented']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
