"""Evaluate routing on mixed traffic, as a node sees it: requests of in-distribution and shifted queries.

A stream is a random order of whole requests (one query and all its graded items): every
in-distribution query of a split, and shifted queries drawn (fixed seed) until their pairs carry a
share ``s`` of the stream. Each contender scores the stream request by request under one routing
budget ``B`` (a :class:`~darl_lite.budget.RouteBudget` over the whole stream, on a request clock),
with the same :func:`darl_lite.cascade.plan_call` a node runs. Reported per part (in-distribution
pairs, shifted pairs) and overall: macro-F1, NDCG@10, the route rate and the share of shifted
queries whose list (its routed head) went to the teacher; over several draws, mean and standard
deviation, and each contender's overall macro-F1 against random routing's on the same streams.

A node that has been serving for a while has a full budget window; one that just started has an
empty one, and then no list larger than the share B of the pairs seen so far can be routed. By
default (``warm_up=True``) the node first serves another draw of the same traffic through the same
budget (answers discarded), so what is measured is the steady state; ``warm_up=False`` measures the
cold start. Random routing needs no window: it sends exactly B of the stream's pairs either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.budget import RouteBudget
from darl_lite.calibration import softmax
from darl_lite.cascade import plan_call
from darl_lite.cascade_fit import bootstrap_mean_interval, graded_report, per_query_ndcg
from darl_lite.errors import InputError
from darl_lite.metrics import auroc
from darl_lite.routing import RoutingPolicy
from darl_lite.shift import query_means
from darl_lite.shift_routing import ShiftRouting
from darl_lite.types import Pair

#: ``student``: the student as a node serves it alone (its bundle's grade corrections applied);
#: ``teacher``: the teacher alone, its own argmax grades; ``all_routed``: every pair routed and
#: answered as a node answers a routed list (blended with the student, corrected); ``random``: the
#: served student with a random B of pairs routed one by one and answered as a node answers those
#: (the routed answer's grade, the student's probabilities: one model ranks a list); ``uncertainty``: last
#: round's per-pair router, blind to shift, the teacher's uncorrected answers; ``cascade``: the
#: bundle's distribution-aware routing (:func:`darl_lite.cascade.plan_call`).
CONTENDERS: tuple[str, ...] = ("student", "teacher", "all_routed", "random", "uncertainty", "cascade")


#: Seeds of the warm-up draws are offset by this from the measured streams' (never the same draw).
WARM_UP_SEED = 100
#: Streams drawn per (share, budget). Why 20, not 5: on the shipped test splits at s = 10%, B = 10%
#: the cascade's paired macro-F1 difference to random routing was +0.0014 over the first 5 draws
#: (3 above zero), +0.0033 over 20 (14 above) and +0.0054 over 40 (34 above): with 5, one unlucky
#: draw decides the sign (docs/benchmarks.md, "Seventh session").
DEFAULT_DRAWS = 20


@dataclass(frozen=True)
class StreamData:
    """Recorded outputs for every pair of the in-distribution and the shifted split, concatenated."""

    queries: Sequence[str]
    grades: NDArray[np.int64]
    logits: NDArray[np.float64]  # raw student logits
    ood: NDArray[np.float64]
    teacher: NDArray[np.float64]
    shifted: NDArray[np.bool_]  # the pair belongs to the shifted split
    temperature: float
    gains: Sequence[float]


def build_stream(data: StreamData, share: float, seed: int) -> list[NDArray[np.intp]]:
    """Row indices of each request, in stream order: all in-distribution queries plus shifted ones
    drawn until their pairs come closest to ``share`` of the stream. Shares 0 and 1 give the
    in-distribution or the shifted split alone."""
    if not 0.0 <= share <= 1.0:
        raise InputError(f"shifted share must lie in [0, 1], got {share}")
    q = np.asarray(data.queries, dtype=object)
    groups = {query: np.flatnonzero(q == query) for query in dict.fromkeys(data.queries)}
    id_groups = [g for g in groups.values() if not data.shifted[g[0]]]
    shifted_groups = [g for g in groups.values() if data.shifted[g[0]]]
    rng = np.random.default_rng(seed)
    if share in (0.0, 1.0):  # one split alone, in a random order
        alone = id_groups if share == 0.0 else shifted_groups
        return [alone[i] for i in rng.permutation(len(alone)).tolist()]
    n_id = sum(len(g) for g in id_groups)
    target = share / (1.0 - share) * n_id
    chosen: list[NDArray[np.intp]] = []
    total = 0
    for index in rng.permutation(len(shifted_groups)).tolist():
        group = shifted_groups[index]
        if abs(total + len(group) - target) > abs(total - target) and chosen:
            break
        chosen.append(group)
        total += len(group)
    requests = id_groups + chosen
    return [requests[i] for i in rng.permutation(len(requests)).tolist()]


@dataclass(frozen=True)
class StreamResult:
    """One contender's answers for a stream's rows (request order)."""

    probs: NDArray[np.float64]  # final probabilities: they rank each list
    grades: NDArray[np.intp]  # final grade decisions
    routed: NDArray[np.bool_]
    listed: NDArray[np.bool_]  # routed as a whole shifted list


def run_stream(
    data: StreamData,
    requests: Sequence[NDArray[np.intp]],
    contender: str,
    *,
    budget_fraction: float,
    policy: RoutingPolicy,
    shift: ShiftRouting | None,
    seed: int = 0,
    warm_up: Sequence[NDArray[np.intp]] = (),
) -> StreamResult:
    """Score the stream request by request as ``contender`` would (see :data:`CONTENDERS`), after
    the ``warm_up`` requests (served through the same budget, their answers discarded)."""
    if contender not in CONTENDERS:
        raise InputError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
    rows = np.concatenate(list(requests)) if requests else np.zeros(0, np.intp)
    teacher = data.teacher[rows]
    none = np.zeros(len(rows), bool)
    student = softmax(data.logits[rows], data.temperature)
    queries = [data.queries[i] for i in rows.tolist()]
    if shift is not None:
        assignment = shift.assign(queries)
        served = shift.student_grades(data.logits[rows], assignment.kind)
        answer, answer_grades = shift.fallback_answer(student, teacher, assignment.kind)
    else:
        served, answer, answer_grades = student.argmax(1), teacher, teacher.argmax(1)
    if contender == "student":
        return StreamResult(student, served, none, none)
    if contender == "teacher":
        return StreamResult(teacher.copy(), teacher.argmax(1), ~none, none)
    if contender == "all_routed":
        return StreamResult(answer.copy(), answer_grades, ~none, none)
    if contender == "random":  # pairs routed one by one, answered as a node answers them
        routed = none.copy()
        k = int(np.floor(budget_fraction * len(rows)))
        routed[np.random.default_rng(seed).choice(len(rows), size=min(k, len(rows)), replace=False)] = True
        probs = student if shift is not None else np.where(routed[:, None], answer, student)
        return StreamResult(probs, np.where(routed, answer_grades, served), routed, none)
    clock = [0.0]
    served_requests = [*warm_up, *requests]
    budget = RouteBudget(budget_fraction, window_s=len(served_requests) + 1.0, clock=lambda: clock[0])
    parts: list[tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.bool_], NDArray[np.bool_]]] = []
    for step, request in enumerate(served_requests):
        clock[0] = float(step)
        plan = plan_call(
            data.logits[request],
            data.ood[request],
            [data.queries[i] for i in request.tolist()],
            temperature=data.temperature,
            policy=policy,
            shift=shift if contender == "cascade" else None,
            budget=budget,
            gains=data.gains,
        )
        decided, probs = plan.grades.copy(), plan.student.copy()
        probs[plan.routed], decided[plan.routed] = plan.fallback_answer(
            data.teacher[request][plan.routed], shift if contender == "cascade" else None
        )
        if step >= len(warm_up):
            parts.append((probs, decided, plan.routed, plan.list_routed))
    return StreamResult(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


def _parts(data: StreamData, rows: NDArray[np.intp], result: StreamResult) -> dict[str, dict[str, float]]:
    queries = [data.queries[i] for i in rows.tolist()]
    grades = data.grades[rows]
    shifted = data.shifted[rows]
    out = {}
    for part, mask in (
        ("overall", np.ones(len(rows), bool)),
        ("in_distribution", ~shifted),
        ("shifted", shifted),
    ):
        index = np.flatnonzero(mask)
        if len(index):
            out[part] = graded_report(
                result.probs[index],
                result.grades[index],
                grades[index],
                [queries[i] for i in index.tolist()],
                data.gains,
            )
    return out


def evaluate_mixed(
    data: StreamData,
    *,
    shares: Sequence[float] = (0.10, 0.30),
    budgets: Sequence[float] = (0.05, 0.10, 0.20),
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    policy: RoutingPolicy,
    shift: ShiftRouting | None,
    warm_up: bool = True,
) -> list[dict[str, Any]]:
    """Every contender on every (share, budget), ``draws`` streams each: mean and sd per metric.
    ``warm_up``: each stream is preceded by another draw of the same traffic (see the module)."""
    _check_draws(draws)
    rows_out = []
    for share in shares:
        streams = [build_stream(data, share, seed + d) for d in range(draws)]
        warm = [build_stream(data, share, seed + WARM_UP_SEED + d) if warm_up else [] for d in range(draws)]
        for budget in budgets:
            per: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
            per_query: dict[str, list[tuple[str, float]]] = {c: [] for c in CONTENDERS}
            for d, requests in enumerate(streams):
                rows = np.concatenate(requests)
                for contender in CONTENDERS:
                    answer = run_stream(
                        data,
                        requests,
                        contender,
                        budget_fraction=budget,
                        policy=policy,
                        shift=shift,
                        seed=seed + 1000 + d,
                        warm_up=warm[d],
                    )
                    result: dict[str, Any] = _parts(data, rows, answer)
                    ndcg = per_query_ndcg(
                        answer.probs, data.grades[rows], [data.queries[i] for i in rows.tolist()], data.gains
                    )
                    per_query[contender].extend(ndcg.items())
                    shifted_rows = data.shifted[rows]
                    result["route_rate"] = float(answer.routed.mean())
                    result["shifted_queries_listed"] = _listed_share(data, rows, answer.listed, shifted_rows)
                    per[contender].append(result)
            summary = {c: _mean_sd(v) for c, v in per.items()}
            for c in CONTENDERS:  # paired per-query NDCG@10 difference to the student, pooled over draws
                diffs = [a[1] - b[1] for a, b in zip(per_query[c], per_query["student"], strict=True)]
                lo, hi = bootstrap_mean_interval(diffs, seed=seed)
                summary[c]["ndcg_vs_student"] = {"mean": float(np.mean(diffs)), "ci90": [lo, hi]}
                # paired overall macro-F1 difference to random routing, draw by draw (same streams)
                f1 = [
                    a["overall"]["macro_f1"] - b["overall"]["macro_f1"]
                    for a, b in zip(per[c], per["random"], strict=True)
                ]
                f1_lo, f1_hi = bootstrap_mean_interval(f1, seed=seed)
                summary[c]["f1_vs_random"] = {
                    "mean": float(np.mean(f1)),
                    "min": float(min(f1)),
                    "max": float(max(f1)),
                    "ci90": [f1_lo, f1_hi],  # bootstrap over draws: crude at a handful of draws
                    "draws_above": int(sum(x > 0 for x in f1)),
                }
            rows_out.append(
                {"share": share, "budget": budget, "draws": draws, "warm_up": warm_up, "contenders": summary}
            )
    return rows_out


def _check_draws(draws: object) -> None:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise InputError(
            f"draws (--draws) must be an integer >= 1, the streams per share and budget; got {draws!r}"
        )


def _listed_share(
    data: StreamData, rows: NDArray[np.intp], lists: NDArray[np.bool_], shifted_rows: NDArray[np.bool_]
) -> float:
    queries = np.asarray([data.queries[i] for i in rows.tolist()], dtype=object)
    shifted_queries = set(queries[shifted_rows].tolist())
    if not shifted_queries:
        return 0.0
    return len(set(queries[lists & shifted_rows].tolist())) / len(shifted_queries)


def _mean_sd(results: list[dict[str, Any]]) -> dict[str, Any]:
    def agg(values: list[float]) -> dict[str, float]:
        return {
            "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }

    out: dict[str, Any] = {}
    for key, value in results[0].items():
        if isinstance(value, dict):
            out[key] = {m: agg([r[key][m] for r in results if key in r]) for m in value}
        else:
            out[key] = agg([r[key] for r in results])
    return out


def mixed_report(
    scorer: Any,
    id_pairs: Sequence[Pair],
    shifted_pairs: Sequence[Pair],
    teacher_id: NDArray[np.floating],
    teacher_shifted: NDArray[np.floating],
    *,
    shares: Sequence[float] = (0.10, 0.30),
    budgets: Sequence[float] = (0.05, 0.10, 0.20),
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    warm_up: bool = True,
    cold_start_too: bool = False,
) -> dict[str, Any]:
    """Score both splits with ``scorer`` (a :class:`darl_lite.Scorer`), then report shift detection
    (query- and pair-level AUROC of the domain and density detectors) and :func:`evaluate_mixed`
    (``streams``: steady state, or cold start with ``warm_up=False``; ``cold_start_too`` adds the
    cold start as ``streams_cold_start``)."""
    _check_draws(draws)  # before the scoring, which takes a while
    pairs = [*id_pairs, *shifted_pairs]
    if any(p.grade is None for p in pairs):
        raise InputError("mixed_report needs graded pairs (human grades) on both splits")
    queries = [p.query for p in pairs]
    outputs = scorer.score_arrays(queries, [p.item for p in pairs])
    shifted = np.r_[np.zeros(len(id_pairs), bool), np.ones(len(shifted_pairs), bool)]
    ood = np.asarray(outputs.ood_scores, np.float64)
    id_queries = sorted({p.query for p in id_pairs})
    shifted_queries = sorted({p.query for p in shifted_pairs})
    density = query_means(ood, queries)
    detection: dict[str, Any] = {
        "pair_auroc_density": auroc(ood[~shifted], ood[shifted]),
        "query_auroc_density": auroc([density[q] for q in id_queries], [density[q] for q in shifted_queries]),
    }
    if scorer.shift is not None:
        prob = scorer.shift.assign(queries).probability
        per_query = dict(zip(queries, prob.tolist(), strict=True))
        detection["query_auroc_domain"] = auroc(
            [per_query[q] for q in id_queries], [per_query[q] for q in shifted_queries]
        )
        detection["pair_auroc_domain"] = auroc(prob[~shifted], prob[shifted])
    data = StreamData(
        queries,
        np.asarray([p.grade for p in pairs], np.int64),
        np.asarray(outputs.logits, np.float64),
        ood,
        np.concatenate([np.asarray(teacher_id, np.float64), np.asarray(teacher_shifted, np.float64)]),
        shifted,
        scorer.temperature,
        scorer.bundle.grade_gains,
    )

    def evaluate(warm: bool) -> list[dict[str, Any]]:
        return evaluate_mixed(
            data,
            shares=shares,
            budgets=budgets,
            draws=draws,
            seed=seed,
            policy=scorer.routing,
            shift=scorer.shift,
            warm_up=warm,
        )

    report: dict[str, Any] = {"detection": detection, "streams": evaluate(warm_up)}
    if cold_start_too and warm_up:
        report["streams_cold_start"] = evaluate(False)
    return report


def detection_line(detection: dict[str, float]) -> str:
    """One line: the AUROC of each detector, query- and pair-level."""
    return (
        "Shift detection, in-distribution vs shifted, AUROC: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in detection.items())
        + "."
    )


def mixed_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The :func:`evaluate_mixed` rows as a Markdown table (mean ± sd over draws)."""
    state = (
        "steady state (each stream served after a warm-up draw of the same traffic)"
        if all(row.get("warm_up", False) for row in rows)
        else "cold start (empty budget window)"
    )
    lines = [
        "Mixed traffic: shifted queries carry a share s of the pairs; budget B of the stream's pairs; "
        f"{state}; mean ± sd over draws; ΔNDCG = paired per-query NDCG@10 difference to the student, "
        "90% interval; ΔF1 vs random = paired overall macro-F1 difference to random routing on the same "
        "streams, mean over draws [smallest, largest], draws above zero of all draws.",
        "",
        "| s | B | contender | route rate | shifted lists | F1 all | NDCG all | F1 in-dist | NDCG in-dist "
        "| F1 shifted | NDCG shifted | ΔNDCG vs student | ΔF1 all vs random [min, max] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name, m in row["contenders"].items():
            cells = []
            for part in ("overall", "in_distribution", "shifted"):
                for key in ("macro_f1", "ndcg@10"):
                    v = m.get(part, {}).get(key)
                    cells.append(f"{v['mean']:.3f} ± {v['sd']:.3f}" if v else "–")
            d = m["ndcg_vs_student"]
            r = m.get("f1_vs_random")
            vs_random = _vs_random_cell(r, row["draws"])
            lines.append(
                f"| {row['share']:.0%} | {row['budget']:.0%} | {name} | {m['route_rate']['mean']:.1%} "
                f"| {m['shifted_queries_listed']['mean']:.0%} | "
                + " | ".join(cells)
                + f" | {d['mean']:+.3f} [{d['ci90'][0]:+.3f}, {d['ci90'][1]:+.3f}] | {vs_random} |"
            )
    return lines


def _vs_random_cell(paired: dict[str, Any] | None, draws: int) -> str:
    """``mean [min, max], k/n above`` of a paired F1 difference (reports before the count: no count)."""
    if not paired:
        return "–"
    cell = f"{paired['mean']:+.4f} [{paired['min']:+.4f}, {paired['max']:+.4f}]"
    return cell + (f", {paired['draws_above']}/{draws} above" if "draws_above" in paired else "")


__all__ = [
    "CONTENDERS",
    "DEFAULT_DRAWS",
    "WARM_UP_SEED",
    "StreamData",
    "StreamResult",
    "build_stream",
    "detection_line",
    "evaluate_mixed",
    "mixed_report",
    "mixed_table",
    "run_stream",
]
