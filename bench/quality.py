"""Quality suite: teacher, student fp32, student int8, the cascade, and ST's own int8 export.

    python -m bench.quality --bundle B [--st-dir D] --out quality.json

On id_test and ood_test (shipped data, fold 0): macro-F1, accuracy, per-grade F1, NDCG@10 and ECE;
reliability bins; OOD AUROC and FPR@95%TPR of the Mahalanobis score (id_test = negatives); the
cascade at the bundle's own policy and quality against route rate with the scorer's
``RoutingPolicy.urgency`` and random routing at equal rates (mean of ``--repeats`` draws); int8 vs
fp32 NDCG@10 with a paired bootstrap over queries; and a parity check that ST's torch model and
darl-lite's fp32 graph are the same weights. Raw OOD scores go to an ``.npz`` beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite.datasets import load_dbpedia
from darl_lite.inference import SessionConfig
from darl_lite.metrics import auroc, fpr_at_tpr, grading_report, per_class_f1
from darl_lite.route_curve import node_route_curve
from darl_lite.scorer import Scorer, softmax
from darl_lite.teacher_file import FileTeacher, shipped_teacher_path
from darl_lite.types import Pair

RATES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
SPLITS = ("id_test", "ood_test")


def per_query_ndcg(qids: list[str], grades: np.ndarray, scores: np.ndarray, gains, k: int = 10) -> dict:
    """NDCG@k of each query with a relevant item (those :func:`darl_lite.metrics.ndcg_at_k` averages)."""
    gain = np.asarray(gains, np.float64)
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        groups.setdefault(q, []).append(i)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    out = {}
    for q, rows in groups.items():
        idx = np.asarray(rows)
        g = gain[grades[idx]]
        ideal = np.sort(g)[::-1][:k]
        idcg = float(ideal @ discounts[: len(ideal)])
        if idcg <= 0:
            continue
        ranked = g[np.argsort(-scores[idx], kind="stable")][:k]
        out[q] = float(ranked @ discounts[: len(ranked)]) / idcg
    return out


def paired_bootstrap(a: dict, b: dict, n: int = 2000, seed: int = 0) -> dict:
    """Mean of a − b over queries with a 95% bootstrap interval (queries resampled with replacement)."""
    keys = sorted(a)
    diff = np.asarray([a[k] - b[k] for k in keys])
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(axis=1)
    return {
        "mean_diff": float(diff.mean()),
        "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "queries": len(keys),
    }


def reliability(probs: np.ndarray, grades: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width confidence bins, as :func:`darl_lite.metrics.expected_calibration_error` uses."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == grades).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    acc = np.bincount(bins, weights=correct, minlength=n_bins)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "count": count.tolist(),
        "accuracy": (acc / safe).tolist(),
        "confidence": (mean_conf / safe).tolist(),
    }


def evaluate(probs: np.ndarray, grades: np.ndarray, qids: list[str], gains, names) -> dict:
    report: dict[str, Any] = grading_report(probs, grades, qids, gains=gains)
    f1 = per_class_f1(grades, probs.argmax(axis=1), probs.shape[1])
    report["per_grade_f1"] = {name: float(v) for name, v in zip(names, f1, strict=True)}
    return report


def run(
    bundle: Path,
    st_dir: Path | None,
    threads: int = 2,
    rates=RATES,
    repeats: int = 10,
    max_queries: int | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    started = time.perf_counter()
    data = load_dbpedia(fold=0)
    teacher = FileTeacher.from_file(shipped_teacher_path())
    session = SessionConfig(intra_op_threads=threads)
    scorers = {p: Scorer.load(bundle, precision=p, session=session) for p in ("fp32", "int8")}
    gains, names = scorers["int8"].bundle.grade_gains, scorers["int8"].grade_names
    temperature = scorers["int8"].temperature

    def teacher_fallback(batch: list[tuple[str, str]]) -> np.ndarray:
        return teacher.predict_proba([Pair(q, i) for q, i in batch])

    cascade = Scorer(scorers["int8"].bundle, precision="int8", session=session, fallback=teacher_fallback)
    st_model = None
    if st_dir is not None:
        from bench.common import ContenderFactory

        st_model = ContenderFactory(bundle, st_dir, max_length=cascade.bundle.max_length)._model(
            "st_onnx_int8", threads
        )

    models = ("teacher", "student_fp32", "student_int8", "cascade_default", "st_onnx_int8")
    metrics: dict[str, dict[str, Any]] = {m: {} for m in models}
    bins: dict[str, dict[str, Any]] = {m: {} for m in models}
    curves, ndcg_gap, route_rate, arrays = {}, {}, {}, {}
    for split in SPLITS:
        pairs = list(data.split(split))
        if max_queries is not None:
            keep = set(sorted({str(p.query_id) for p in pairs})[:max_queries])
            pairs = [p for p in pairs if str(p.query_id) in keep]
        queries, items = [p.query for p in pairs], [p.item for p in pairs]
        grades = np.asarray([p.grade for p in pairs])
        qids = [p.query_id or p.query for p in pairs]
        probs: dict[str, np.ndarray] = {"teacher": teacher.predict_proba(pairs).astype(np.float64)}
        fp32 = scorers["fp32"].score_arrays(queries, items)
        scored = cascade.score_arrays(queries, items)
        probs["student_fp32"] = fp32.student_probabilities
        probs["student_int8"] = scored.student_probabilities
        probs["cascade_default"] = scored.probabilities
        route_rate[split] = float(scored.from_llm.mean())
        if st_model is not None:
            logits = st_model.predict(
                list(zip(queries, items, strict=True)), batch_size=32, show_progress_bar=False
            )
            probs["st_onnx_int8"] = softmax(np.asarray(logits), temperature)  # the bundle's calibration
        for model, p in probs.items():
            metrics[model][split] = evaluate(p, grades, qids, gains, names)
            bins[model][split] = reliability(p, grades)
        curves[split] = node_route_curve(
            scored.logits,
            scored.ood_scores,
            probs["teacher"],
            grades,
            queries,
            temperature=cascade.temperature,
            policy=cascade.routing,
            shift=cascade.shift,
            query_ids=qids,
            rates=rates,
            gains=gains,
            random_repeats=repeats,
        )
        g = np.asarray(gains)
        ndcg_gap[split] = paired_bootstrap(
            per_query_ndcg(qids, grades, probs["student_int8"] @ g, gains),
            per_query_ndcg(qids, grades, probs["student_fp32"] @ g, gains),
        )
        arrays[f"ood_int8_{split}"] = scored.ood_scores
        arrays[f"ood_fp32_{split}"] = fp32.ood_scores
    ood = {
        p: {
            "auroc": auroc(arrays[f"ood_{p}_id_test"], arrays[f"ood_{p}_ood_test"]),
            "fpr_at_95_tpr": fpr_at_tpr(arrays[f"ood_{p}_id_test"], arrays[f"ood_{p}_ood_test"], tpr=0.95),
            "threshold": float(cascade.bundle.manifest["ood"]["thresholds"][p]),
        }
        for p in ("fp32", "int8")
    }
    result = {
        "splits": {s: len(arrays[f"ood_int8_{s}"]) for s in SPLITS},
        "teacher": {"name": teacher.name, "kind": teacher.kind},
        "metrics": {m: v for m, v in metrics.items() if v},
        "reliability": {m: v for m, v in bins.items() if v},
        "ood_detection": ood,
        "cascade_default": {
            "policy": {k: v for k, v in vars(cascade.routing).items()},
            "route_rate": route_rate,
        },
        "route_curve": curves,
        "route_curve_repeats": repeats,
        "int8_vs_fp32_ndcg": ndcg_gap,
        "parity_st_torch_vs_darl_fp32": _parity(bundle, st_dir, data, scorers["fp32"]) if st_dir else None,
        "temperature": temperature,
        "seconds": time.perf_counter() - started,
    }
    return result, arrays


def _parity(bundle: Path, st_dir: Path, data, scorer: Scorer) -> dict:
    """ST's torch model and darl-lite's fp32 graph on the same 64 pairs: the same weights?"""
    from sentence_transformers import CrossEncoder

    pairs = list(data.id_test)[:64]
    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    ours = scorer.model.run(queries, items).logits
    theirs = CrossEncoder(str(st_dir), device="cpu", max_length=scorer.bundle.max_length).predict(
        list(zip(queries, items, strict=True)), batch_size=32, show_progress_bar=False
    )
    return {"pairs": len(pairs), "max_abs_logit_diff": float(np.abs(ours - np.asarray(theirs)).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--st-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-queries", type=int, default=None, help="debug: first N queries per split")
    args = parser.parse_args()
    result, arrays = run(args.bundle, args.st_dir, args.threads, RATES, args.repeats, args.max_queries)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    named: dict[str, Any] = dict(arrays)  # savez's keywords: arrays by name
    np.savez(args.out.with_suffix(".npz"), **named)


if __name__ == "__main__":
    main()
