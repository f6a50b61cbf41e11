"""Where a darl-lite ``score`` call spends its time, beyond the ONNX graph.

    python -m bench.profile_score --bundle B --out profile.json [--items 100] [--threads 2]

1. ``stages``: the steps of ``Scorer.score`` re-run one by one with ``time.perf_counter`` splits
   (validate; the batch plan: character cap, tokenise, sort, pad; the ``session.run`` calls with the
   scatter of their outputs; for a call of up to ``SMALL_CALL_PAIRS`` pairs, the row plan
   (``darl_lite.small_call``), else softmax, the numpy OOD score for bundles without it in the
   graph, routing and notes; result objects),
   median over ``--reps`` calls, beside a real ``scorer.score`` call and the raw session on the
   same batches.
2. ``cprofile``: the top functions of ``--reps`` real calls by own time.
3. ``alternatives``: measured prototypes of other choices (never applied to the runtime): the OOD
   score in numpy float64/float32, tokenising idle vs right after a run, spinning off, and the
   whole call at other batch sizes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import latency_requests
from darl_lite import Scorer, SessionConfig
from darl_lite.bundle import model_role
from darl_lite.cascade import plan_call
from darl_lite.scorer import ScoredArrays, _check_items, _check_text
from darl_lite.small_call import SMALL_CALL_PAIRS


def _median(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage_split(scorer: Scorer, query: str, items: list[str], reps: int) -> dict[str, float]:
    model, n = scorer.model, len(items)
    stages: dict[str, list[float]] = {}

    def tick(name: str, started: float) -> float:
        now = time.perf_counter()
        stages.setdefault(name, []).append(now - started)
        return now

    for rep in range(reps + 1):
        t = time.perf_counter()
        _check_text(query, "query")
        _check_items(items, "items")
        queries, its = [query] * n, list(items)
        t = tick("validate", t)
        plan = model.plan(queries, its)
        t = tick("tokenise_sort_pad", t)
        outputs = model.run_plan(plan)
        logits, ood = outputs.logits, outputs.ood
        tick("session_runs_and_scatter", t)
        rows = None
        if n <= SMALL_CALL_PAIRS and ood is not None:  # the path score() takes for a small call
            t = time.perf_counter()
            ood_list = ood.tolist()
            rows = scorer._row_plan(queries, logits.tolist(), ood_list)
            if rows is not None:
                t = tick("row plan (darl_lite.small_call.plan_rows)", t)
                scorer._row_results(rows, ood_list, outputs.truncated.tolist())
                tick("result_objects", t)
        if rows is None:
            _array_stages(scorer, outputs, queries, plan.truncated, tick)
        if rep == 0:  # warm-up
            stages.clear()
    return {k: statistics.median(v) for k, v in stages.items()}


def _array_stages(scorer: Scorer, outputs, queries: list[str], truncated, tick) -> None:
    """The array path's stages (a call over ``SMALL_CALL_PAIRS``, or one the row plan declines)."""
    n = len(queries)
    t = time.perf_counter()
    ood = outputs.ood
    ood_scores = ood.astype(np.float64) if ood is not None else scorer.detector.score(outputs.pooled)
    t = tick("ood_score (numpy; ~0 when in the graph)", t)
    routing = plan_call(outputs.logits, ood_scores, queries, gains=scorer.gains, **scorer._routing_args())
    t = tick("softmax_shift_routing (darl_lite.cascade.plan_call)", t)
    scored = ScoredArrays(
        probabilities=routing.student,
        student_probabilities=routing.student,
        logits=outputs.logits,
        ood_scores=ood_scores,
        candidate=routing.candidate,
        routed=routing.routed,
        from_llm=np.zeros(n, bool),
        truncated=truncated,
        notes=routing.notes,
        query_shift=routing.query_shift,
        list_routed=routing.list_routed,
        grades=routing.grades,
    )
    scorer._to_results(scored)
    tick("result_objects", t)


def alternatives(bundle: Path, scorer: Scorer, query: str, items: list[str], threads: int, reps: int) -> dict:
    model, n = scorer.model, len(items)
    out: dict[str, float | dict] = {}
    pooled = model.run([query] * n, items).pooled
    det = scorer.detector
    p32, m32 = det.precision.astype(np.float32), det.means.astype(np.float32)
    quad_m = np.einsum("cd,dk,ck->c", det.means, det.precision, det.means).astype(np.float32)

    def ood32() -> np.ndarray:
        xp = pooled @ p32
        return np.maximum(np.einsum("nd,nd->n", xp, pooled)[:, None] - 2 * xp @ m32.T + quad_m, 0).min(1)

    feeds = model.plan([query] * n, items).batches[0][1]

    def after_run(fn) -> float:
        """``fn`` timed right after a ``session.run``, as in a real call (the ORT pool still spinning)."""
        times = []
        for _ in range(reps):
            model.session.run(model.output_names, feeds)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def tokenise() -> None:
        model.encoder.encode([query] * n, items)

    out["ood_float64_idle_s"] = _median(lambda: det.score(pooled), reps)
    out["ood_float64_after_run_s"] = after_run(lambda: det.score(pooled))
    out["ood_float32_cached_idle_s"] = _median(ood32, reps)
    out["ood_float32_cached_after_run_s"] = after_run(ood32)
    out["ood_float32_max_rel_diff"] = float(
        np.max(np.abs(ood32() - det.score(pooled)) / np.maximum(det.score(pooled), 1e-9))
    )
    out["tokenise_idle_s"] = _median(tokenise, reps)
    out["tokenise_after_run_s"] = after_run(tokenise)
    no_spin = Scorer.load(bundle, precision="int8", session=SessionConfig(intra_op_threads=threads))
    options = SessionConfig(intra_op_threads=threads).session_options()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    no_spin.model.session = ort.InferenceSession(
        str(no_spin.bundle.path_of(model_role("int8"))),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(SessionConfig().disabled_optimizers),
    )
    out["score_spinning_on_s"] = _median(lambda: scorer.score(query, items), reps)
    out["score_spinning_off_s"] = _median(lambda: no_spin.score(query, items), reps)
    sweep = {}
    for batch_size in (16, 32, 64, 128):
        s = Scorer.load(
            bundle, precision="int8", session=SessionConfig(intra_op_threads=threads), batch_size=batch_size
        )
        sweep[str(batch_size)] = _median(lambda s=s: s.score(query, items), reps)
    out["score_by_batch_size_s"] = sweep
    return out


def run(bundle: Path, n_items: int, threads: int, reps: int) -> dict:
    query, items = latency_requests((n_items,))[n_items]
    scorer = Scorer.load(bundle, precision="int8", session=SessionConfig(intra_op_threads=threads))
    total = _median(lambda: scorer.score(query, items), reps)
    stages = stage_split(scorer, query, items, reps)
    from bench.common import RawSession, _raw_call

    raw = _median(_raw_call(RawSession(bundle, threads), query, items), reps)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        scorer.score(query, items)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
    top = []
    by_function = stats.stats  # type: ignore[attr-defined]  # set by pstats at runtime, not in its stubs
    for (file, line, func), (_cc, calls, tottime, cumtime, _) in sorted(
        by_function.items(), key=lambda kv: -kv[1][2]
    )[:15]:
        top.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "calls_per_score": calls / reps,
                "tottime_ms_per_score": 1e3 * tottime / reps,
                "cumtime_ms_per_score": 1e3 * cumtime / reps,
            }
        )
    return {
        "items": n_items,
        "threads": threads,
        "reps": reps,
        "score_median_s": total,
        "raw_session_median_s": raw,
        "stages_median_s": stages,
        "cprofile_top": top,
        "alternatives": alternatives(bundle, scorer, query, items, threads, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(args.bundle, args.items, args.threads, args.reps), indent=2) + "\n")


if __name__ == "__main__":
    main()
