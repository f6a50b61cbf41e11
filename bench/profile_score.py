"""Where a darl-lite ``score`` call spends its time, beyond the ONNX graph.

    python -m bench.profile_score --bundle B --out profile.json [--items 100] [--threads 2]

1. ``stages``: the steps of ``Scorer.score`` re-run one by one with ``time.perf_counter`` splits
   (validate, character cap, tokenise, lengths and sort, build feeds, ``session.run``, scatter,
   softmax, OOD score, routing and notes, result objects), median over ``--reps`` calls, beside a
   real ``scorer.score`` call and the raw session on the same batches.
2. ``cprofile``: the top functions of ``--reps`` real calls by own time.
3. ``alternatives``: measured prototypes of cheaper steps (never applied to the runtime): feeds built
   with numpy instead of a per-row loop, result objects from ``tolist()``, the OOD score in float32,
   and the whole call at other batch sizes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
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
from darl_lite.scorer import PairScore, _check_items, _check_text, softmax


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
        cap = model._char_cap
        cut = np.fromiter((len(q) > cap or len(x) > cap for q, x in zip(queries, its, strict=True)), bool, n)
        t = tick("char_cap", t)
        encodings = model._encode(queries, its)
        t = tick("tokenise", t)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, n)
        truncated = cut | np.fromiter((len(e.overflowing) > 0 for e in encodings), bool, n)
        order = np.argsort(lengths, kind="stable")
        t = tick("lengths_sort", t)
        feeds_s = run_s = scatter_s = 0.0
        logits = pooled = None
        for start in range(0, n, model.batch_size):
            a = time.perf_counter()
            index = order[start : start + model.batch_size]
            feeds = model._feeds([encodings[i] for i in index], int(lengths[index].max()))
            b = time.perf_counter()
            bl, bp = model.session.run(model.output_names, feeds)
            c = time.perf_counter()
            if logits is None:
                logits = np.empty((n, bl.shape[1]), np.float32)
                pooled = np.empty((n, bp.shape[1]), np.float32)
            logits[index] = bl
            pooled[index] = bp
            d = time.perf_counter()
            feeds_s, run_s, scatter_s = feeds_s + b - a, run_s + c - b, scatter_s + d - c
        stages.setdefault("feeds", []).append(feeds_s)
        stages.setdefault("session_run", []).append(run_s)
        stages.setdefault("scatter", []).append(scatter_s)
        t = time.perf_counter()
        student = softmax(logits, scorer.temperature)
        t = tick("softmax", t)
        ood = scorer.detector.score(pooled)
        t = tick("ood_score", t)
        decision = scorer.routing.decide(student, ood)
        notes = [""] * n
        for i in np.flatnonzero(decision.candidate & ~decision.routed):
            notes[i] = "x"
        for i in np.flatnonzero(decision.routed):
            notes[i] = "no fallback configured: student answer kept"
        t = tick("routing_notes", t)
        probs = student.copy()
        expected = probs @ scorer.gains
        grades = probs.argmax(axis=1)
        [
            PairScore(
                probabilities=tuple(float(p) for p in probs[i]),
                expected_relevance=float(expected[i]),
                grade=int(grades[i]),
                ood_score=float(ood[i]),
                routed=bool(decision.routed[i]),
                source="student",
                truncated=bool(truncated[i]),
                note=notes[i],
            )
            for i in range(n)
        ]
        tick("result_objects", t)
        if rep == 0:  # warm-up
            stages.clear()
    return {k: statistics.median(v) for k, v in stages.items()}


def fast_feeds(encodings: list, width: int, pad_id: int, input_names: list[str]) -> dict[str, np.ndarray]:
    """Prototype: feeds from flat arrays and a length mask instead of a per-row Python loop."""
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full(mask.shape, pad_id, np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64, lengths.sum())
    types = np.zeros(mask.shape, np.int64)
    types[mask] = np.fromiter(
        itertools.chain.from_iterable(e.type_ids for e in encodings), np.int64, lengths.sum()
    )
    arrays = {"input_ids": ids, "attention_mask": mask.astype(np.int64), "token_type_ids": types}
    return {name: arrays[name] for name in input_names}


def fast_results(probs, expected, grades, ood, routed, from_llm, truncated, notes) -> list[PairScore]:
    """Prototype: one ``tolist()`` per array, then plain zips (no numpy scalar per field)."""
    return [
        PairScore(tuple(p), e, g, o, r, "llm" if f else "student", t, note)
        for p, e, g, o, r, f, t, note in zip(
            probs.tolist(),
            expected.tolist(),
            grades.tolist(),
            ood.tolist(),
            routed.tolist(),
            from_llm.tolist(),
            truncated.tolist(),
            notes,
            strict=True,
        )
    ]


def alternatives(bundle: Path, scorer: Scorer, query: str, items: list[str], threads: int, reps: int) -> dict:
    model, n = scorer.model, len(items)
    encodings = model._encode([query] * n, items)
    lengths = np.asarray([len(e.ids) for e in encodings])
    order = np.argsort(lengths, kind="stable")
    batches = [
        (
            [encodings[i] for i in order[s : s + model.batch_size]],
            int(lengths[order[s : s + model.batch_size]].max()),
        )
        for s in range(0, n, model.batch_size)
    ]
    for encs, width in batches:  # the prototype builds the same arrays
        ref, new = model._feeds(encs, width), fast_feeds(encs, width, model.pad_id, model.input_names)
        assert all(np.array_equal(ref[k], new[k]) for k in ref)
    out: dict[str, float | dict] = {
        "feeds_loop_s": _median(lambda: [model._feeds(e, w) for e, w in batches], reps),
        "feeds_numpy_s": _median(
            lambda: [fast_feeds(e, w, model.pad_id, model.input_names) for e, w in batches], reps
        ),
    }
    scored = scorer.score_arrays([query] * n, items)
    out["results_current_s"] = _median(lambda: scorer._to_results(scored), reps)
    probs = scored.probabilities
    out["results_tolist_s"] = _median(
        lambda: fast_results(
            probs,
            probs @ scorer.gains,
            probs.argmax(axis=1),
            scored.ood_scores,
            scored.routed,
            scored.from_llm,
            scored.truncated,
            scored.notes,
        ),
        reps,
    )
    pooled = model.run([query] * n, items).pooled
    det = scorer.detector
    p32, m32 = det.precision.astype(np.float32), det.means.astype(np.float32)
    quad_m = np.einsum("cd,dk,ck->c", det.means, det.precision, det.means).astype(np.float32)

    def ood32() -> np.ndarray:
        xp = pooled @ p32
        return np.maximum(np.einsum("nd,nd->n", xp, pooled)[:, None] - 2 * xp @ m32.T + quad_m, 0).min(1)

    encs, width = batches[0]
    feeds = model._feeds(encs, width)

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
        model._encode([query] * n, items)

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
        str(no_spin.bundle.path_of(model_role("int8"))), options, providers=["CPUExecutionProvider"]
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
    for (file, line, func), (_cc, calls, tottime, cumtime, _) in sorted(
        stats.stats.items(), key=lambda kv: -kv[1][2]
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
