"""The whole path on the shipped data: teacher outputs → distil → export → score with routing → report.

Stages are imported inside :func:`run_quickstart`, so importing this module needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite.errors import MissingExtraError
from darl_lite.metrics import auroc, fpr_at_tpr, grading_report, macro_f1, per_class_f1, spearman
from darl_lite.route_curve import node_route_curve
from darl_lite.teacher_file import SHIPPED_TEACHER, shipped_teacher_path
from darl_lite.types import GRADE_GAINS, Pair

logger = logging.getLogger(__name__)


#: The name of the shift kind fitted on the shipped unlabeled pool (ood_train's questions).
POOL_KIND = "ood_train pool"
#: Window allowance per-pair routing leaves for whole shifted lists (about one list of the data).
LIST_RESERVE_PAIRS = 200


@dataclass(frozen=True)
class QuickstartConfig:
    out_dir: str = "darl-lite-run"
    fold: int = 0
    teacher_file: str | None = None  # None: the shipped teacher outputs
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    temperature: float = 2.0
    alpha: float = 0.5
    max_length: int = 64
    max_train_pairs: int | None = None
    # Also distil on the unlabeled out-of-distribution pool (ood_train) with the teacher's grades
    # only: the student then learns what the teacher knows beyond the keyword queries.
    distil_pool: bool = True
    threads: int = 0
    seed: int = 0
    progress: bool = True


def _require_training_extras() -> None:
    import importlib.util

    for module, extra in (("torch", "distill"), ("transformers", "distill"), ("onnx", "export")):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError.for_module(module, extra)


def fit_pool_shift(bundle: Any, splits: Any, teacher: Any, *, threads: int = 0) -> Any:
    """Fit the shipped pool's kind of shift into ``bundle`` (rewritten in place, re-hashed): training
    queries vs ood_train's (grades never read); evidence from dev and ood_dev with the teacher's grades."""
    from darl_lite.cascade_fit import fit_pool_kind

    return fit_pool_kind(
        bundle,
        name=POOL_KIND,
        train_queries=[p.query for p in splits.train],
        pool_queries=[p.query for p in splits.ood_train],
        dev_pairs=list(splits.dev),
        shifted_dev_pairs=list(splits.ood_dev),
        teacher=teacher,
        list_reserve_pairs=LIST_RESERVE_PAIRS,
        threads=threads,
    )


def _evaluate(
    probs: np.ndarray, pairs: Sequence[Pair], decided: np.ndarray | None = None
) -> dict[str, float]:
    """Grading metrics; ``decided`` (grade decisions, e.g. after a prior correction) replaces the
    probabilities' argmax for macro-F1, accuracy and F1 of "strong"; NDCG@10 and ECE read ``probs``."""
    grades = np.asarray([p.grade for p in pairs])
    query_ids = [p.query_id or p.query for p in pairs]
    report = grading_report(probs, grades, query_ids, gains=GRADE_GAINS[: probs.shape[1]])
    predicted = probs.argmax(axis=1) if decided is None else np.asarray(decided)
    n_classes = probs.shape[1]
    return {
        **report,
        "macro_f1": macro_f1(grades, predicted, n_classes),
        "accuracy": float(np.mean(predicted == grades)),
        "f1_strong": float(per_class_f1(grades, predicted, n_classes)[-1]),
    }


def run_quickstart(config: QuickstartConfig | None = None) -> dict[str, Any]:
    """Run every stage, write ``report.json`` and ``summary.md`` into ``out_dir``, return the report."""
    _require_training_extras()
    from darl_lite.datasets import load_dbpedia
    from darl_lite.teacher_file import FileTeacher

    cfg = config or QuickstartConfig()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    splits = load_dbpedia(fold=cfg.fold)
    teacher = FileTeacher.from_file(cfg.teacher_file or shipped_teacher_path())
    train, n_pool = _training_pairs(cfg, splits, teacher)
    logger.info("teacher %r (%s); %d training pairs", teacher.name, teacher.kind, len(train))
    with _timed(timing, "distill"):
        student_dir, distilled = _distil(cfg, train, teacher, out)
    with _timed(timing, "export"):
        bundle = _export(cfg, student_dir, out / "bundle", splits, teacher)
    with _timed(timing, "score"):
        scored = _score_test_sets(cfg, bundle, teacher, splits, train)
    report: dict[str, Any] = {
        "teacher": {"name": teacher.name, "kind": teacher.kind},
        "splits": {
            "train": len(train) - n_pool,
            "ood_train_pool (teacher grades only)": n_pool,
            "dev": len(splits.dev),
            "id_test": len(splits.id_test),
            "ood_test": len(splits.ood_test),
        },
        **scored,
        "calibration": bundle.manifest["calibration"],
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
        "distill": distilled,
        "bundle": str(bundle.directory),
        "fold": cfg.fold,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_summary(report), encoding="utf-8")
    return report


@contextlib.contextmanager
def _timed(timing: dict[str, float], step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timing[step] = time.perf_counter() - started


def _training_pairs(cfg: QuickstartConfig, splits: Any, teacher: Any) -> tuple[list[Pair], int]:
    """The train split (optionally subsampled) plus, with ``distil_pool``, the ood_train pool with its
    human grades removed (unlabeled data, graded by the teacher alone); and the pool's size."""
    train = list(splits.train)
    if cfg.max_train_pairs is not None and cfg.max_train_pairs < len(train):
        rng = np.random.default_rng(cfg.seed)
        train = [train[i] for i in sorted(rng.choice(len(train), cfg.max_train_pairs, replace=False))]
    if not cfg.distil_pool:
        return train, 0
    pool = [replace(p, grade=None) for p in splits.ood_train if teacher.covers([p])]
    if cfg.max_train_pairs is not None and cfg.max_train_pairs < len(pool):
        rng = np.random.default_rng(cfg.seed + 1)
        pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.max_train_pairs, replace=False))]
    return train + pool, len(pool)


def _distil(cfg: QuickstartConfig, train: list[Pair], teacher: Any, out: Path) -> tuple[Path, dict[str, Any]]:
    """Step 1: distil the teacher's grade distributions into the MiniLM student; save it."""
    from darl_lite.distill.backbone import load_student
    from darl_lite.distill.trainer import DistillConfig, distill_student, save_student

    logger.info("1/3 distilling the teacher into the MiniLM-L6 student (%d pairs)", len(train))
    model, tokenizer = load_student()
    distill_cfg = DistillConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )
    result = distill_student(
        model, tokenizer, train, teacher.predict_proba(train), distill_cfg, progress=cfg.progress
    )
    student_dir = out / "student"
    save_student(model, tokenizer, student_dir)
    return student_dir, {
        "steps": result.steps,
        "final_loss": _last(result.losses),
        "config": asdict(distill_cfg),
    }


def _export(cfg: QuickstartConfig, student_dir: Path, target: Path, splits: Any, teacher: Any) -> Any:
    """Step 2: ONNX fp32 + int8, parity gate, calibration, OOD detector, then the shift routing
    (domain classifier vs the unlabeled pool, prior correction, decisions from dev + ood_dev)."""
    from darl_lite.export.build import ExportConfig, build_bundle

    logger.info("2/3 exporting: ONNX fp32 + int8, parity gate, calibration, OOD detector, shift routing")
    bundle = build_bundle(
        student_dir,
        target,
        train_pairs=splits.train,
        dev_pairs=splits.dev,
        parity_pairs=[*splits.dev, *splits.ood_dev],
        teacher={
            "name": teacher.name,
            "kind": teacher.kind,
            "file": str(cfg.teacher_file or SHIPPED_TEACHER),
        },
        config=ExportConfig(max_length=cfg.max_length, threads=cfg.threads),
        overwrite=True,
    )
    return fit_pool_shift(bundle, splits, teacher, threads=cfg.threads)


def _score_split(
    split: str,
    pairs: list[Pair],
    fp32: Any,
    cascade: Any,
    teacher: Any,
    majority: int,
    metrics: dict[str, dict[str, dict[str, float]]],
    baseline: dict[str, dict[str, float]],
) -> tuple[Any, Any]:
    """Score one test split with every model into ``metrics``; return the fp32 and cascade arrays."""
    from darl_lite.scorer import softmax

    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    scored_fp32, scored = fp32.score_arrays(queries, items), cascade.score_arrays(queries, items)
    baseline[split] = _evaluate(np.eye(len(cascade.grade_names))[np.full(len(pairs), majority)], pairs)
    teacher_probs = np.asarray(teacher.predict_proba(pairs))
    metrics["teacher"][split] = _evaluate(teacher_probs, pairs)
    served = scored.logits.argmax(axis=1)
    if cascade.shift is not None:  # each grader's decisions with the bundle's corrections
        kinds = cascade.shift.assign(queries).kind
        served = cascade.shift.student_grades(scored.logits, kinds)  # the student's on a node
        # every pair answered as a routed pair is: the teacher blended with the student, corrected
        answer, answer_grades = cascade.shift.fallback_answer(
            scored.student_probabilities, teacher_probs, kinds
        )
        metrics["all_routed"][split] = _evaluate(answer, pairs, answer_grades)
    metrics["student_fp32"][split] = _evaluate(scored_fp32.student_probabilities, pairs)
    metrics["student_int8_uncorrected"][split] = _evaluate(softmax(scored.logits, cascade.temperature), pairs)
    metrics["student_int8"][split] = _evaluate(scored.student_probabilities, pairs, served)
    metrics["cascade"][split] = _evaluate(scored.probabilities, pairs, scored.grades)
    return scored_fp32, scored


def _score_test_sets(
    cfg: QuickstartConfig, bundle: Any, teacher: Any, splits: Any, train: list[Pair]
) -> dict[str, Any]:
    """Step 3: both test sets with the fp32 and int8 students and the int8 cascade routing to the
    teacher; the route curves, parity, OOD and shift detection, and the mixed-traffic table."""
    from darl_lite.inference import SessionConfig
    from darl_lite.mixed_stream import mixed_report
    from darl_lite.scorer import Scorer, softmax

    logger.info("3/3 scoring id_test and ood_test (fp32, int8, int8 cascade routing to the teacher)")
    session = SessionConfig(intra_op_threads=cfg.threads)

    def teacher_fallback(batch: list[tuple[str, str]]) -> np.ndarray:
        return teacher.predict_proba([Pair(q, i) for q, i in batch])

    fp32 = Scorer(bundle, precision="fp32", session=session)
    cascade = Scorer(bundle, precision="int8", session=session, fallback=teacher_fallback)
    test_sets = {"id_test": list(splits.id_test), "ood_test": list(splits.ood_test)}
    majority = int(np.bincount([p.grade for p in train if p.grade is not None]).argmax())
    models = (
        "teacher",
        "all_routed",
        "student_fp32",
        "student_int8_uncorrected",
        "student_int8",
        "cascade",
    )
    metrics: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    baseline: dict[str, dict[str, float]] = {}
    ood: dict[str, np.ndarray] = {}
    route_rate: dict[str, float] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    logits: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    for split, pairs in test_sets.items():
        scored_fp32, scored = _score_split(split, pairs, fp32, cascade, teacher, majority, metrics, baseline)
        curves[split] = node_route_curve(
            scored.logits,
            scored.ood_scores,
            teacher.predict_proba(pairs),
            np.asarray([p.grade for p in pairs]),
            [p.query for p in pairs],
            temperature=cascade.temperature,
            policy=cascade.routing,
            shift=cascade.shift,
            query_ids=[p.query_id or p.query for p in pairs],
            gains=bundle.grade_gains,
        )
        ood[split], route_rate[split] = scored.ood_scores, float(scored.from_llm.mean())
        logits["fp32"].append(scored_fp32.logits)
        logits["int8"].append(scored.logits)
    ids, shifted = test_sets["id_test"], test_sets["ood_test"]
    mixed = mixed_report(
        cascade,
        ids,
        shifted,
        teacher.predict_proba(ids),
        teacher.predict_proba(shifted),
        shares=(0.0, 0.10, 0.30, 1.0),
        cold_start_too=True,
    )
    fp32_logits, int8_logits = (np.concatenate(logits[k]) for k in ("fp32", "int8"))
    gains = np.asarray(bundle.grade_gains)
    return {
        "metrics": metrics,
        "baselines": {"majority_grade": {"grade": majority, **baseline}},
        "ood_detection": {
            "auroc": auroc(ood["id_test"], ood["ood_test"]),
            "fpr_at_95_tpr": fpr_at_tpr(ood["id_test"], ood["ood_test"], tpr=0.95),
        },
        "shift_detection": mixed["detection"],
        "routing": {
            "route_rate": route_rate,
            "policy": asdict(cascade.routing),
            "shift": bundle.manifest["routing"].get("shift"),
            "teacher_weight": bundle.manifest["routing"].get("teacher_weight"),
            "in_distribution_grade_weight": bundle.manifest["routing"].get("in_distribution_grade_weight"),
            "in_distribution_bias": bundle.manifest["routing"].get("in_distribution_bias"),
            "in_distribution_fallback_bias": bundle.manifest["routing"].get("in_distribution_fallback_bias"),
            "in_distribution_evidence": bundle.manifest["routing"].get("in_distribution_evidence"),
            "curve": curves,
            "mixed": mixed["streams"],
            "mixed_cold_start": mixed["streams_cold_start"],
        },
        "parity": {
            "argmax_agreement": float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1))),
            "spearman": spearman(softmax(fp32_logits) @ gains, softmax(int8_logits) @ gains),
            "export_gate": bundle.manifest["parity"],
        },
    }


def _last(values: Sequence[float]) -> float | None:
    return float(values[-1]) if len(values) else None


def render_summary(report: dict[str, Any]) -> str:
    """A short Markdown summary a person can read in a minute."""
    lines = [
        "# darl-lite quickstart",
        "",
        f"Teacher: **{report['teacher']['name']}** (kind: `{report['teacher']['kind']}`).",
        "Splits (pairs): " + ", ".join(f"{k} {v:,}" for k, v in report["splits"].items()) + ".",
        "",
        "| model | split | macro-F1 | accuracy | NDCG@10 | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for model, by_split in report["metrics"].items():
        for split, m in by_split.items():
            cells = " | ".join(f"{m[key]:.3f}" for key in ("macro_f1", "accuracy", "ndcg@10", "ece"))
            lines.append(f"| {model} | {split} | {cells} |")
    majority = report["baselines"]["majority_grade"]
    ood, routing, parity = report["ood_detection"], report["routing"], report["parity"]
    lines += [
        "",
        f"Majority-grade baseline (always grade {majority['grade']}): macro-F1 "
        f"{majority['id_test']['macro_f1']:.3f} id_test, {majority['ood_test']['macro_f1']:.3f} ood_test.",
        f"OOD detection (id_test vs ood_test pairs): AUROC {ood['auroc']:.3f}, "
        f"FPR@95%TPR {ood['fpr_at_95_tpr']:.3f}.",
        "Routed to the teacher: "
        + ", ".join(f"{k} {v:.1%}" for k, v in routing["route_rate"].items())
        + f" (budget {routing['policy']['max_route_fraction']:.0%} of each call).",
        f"int8 vs fp32 on both test sets: argmax agreement {parity['argmax_agreement']:.4f}, "
        f"Spearman {parity['spearman']:.4f}.",
        f"Calibration temperature {report['calibration']['temperature']:.3f}: dev ECE "
        f"{report['calibration']['ece_before']:.3f} → {report['calibration']['ece_after']:.3f}.",
        "Time (s): " + ", ".join(f"{k} {v}" for k, v in report["timing_s"].items()) + ".",
        "",
        "Quality on ood_test when pairs go to the teacher one by one, most urgent first as the node "
        "ranks them (corrected decision margin), against a random choice; a pair routed alone keeps "
        "the student's ranking:",
        "",
        "| route rate | router macro-F1 | random macro-F1 | router NDCG@10 | random NDCG@10 |",
        "|---|---|---|---|---|",
        *(
            f"| {row['route_rate']:.0%} | {row['router']['macro_f1']:.3f} | {row['random']['macro_f1']:.3f} "
            f"| {row['router']['ndcg@10']:.3f} | {row['random']['ndcg@10']:.3f} |"
            for row in routing["curve"]["ood_test"]
        ),
        f"Bundle: `{report['bundle']}`.",
        "",
        *render_mixed(report),
    ]
    return "\n".join(lines)


def render_mixed(report: dict[str, Any]) -> list[str]:
    """The shift-detection line and the mixed-traffic table of the summary."""
    from darl_lite.mixed_stream import detection_line, mixed_table

    return [
        detection_line(report.get("shift_detection", {})),
        "",
        *mixed_table(report["routing"].get("mixed", [])),
        "",
    ]
