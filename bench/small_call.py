"""A small call planned row by row (``darl_lite.small_call``) against the array path, one process.

    python -m bench.small_call --bundle B --out small_call.json [--threads 1] [--sizes 1 4 10 16 32]

Two measurements per size, on the id_test request the latency suite uses:

1. ``after_run_us``: everything after the model pass (routing plan and result objects), timed
   right after an onnxruntime run of the call's own batch, the two paths alternating: where a real
   call does this work, with numpy's working set evicted by the run.
2. ``whole_call_ms``: whole ``score`` calls, the row path (what ``Scorer.score`` does) against the
   array path (``finish_arrays`` then result objects, as before), in blocks that take turns, with
   each block's ratio; only up to ``SMALL_CALL_PAIRS`` (a larger call takes the array path either
   way, while (1) still shows what the row plan would cost there).

Both paths must give equal results (asserted per size before timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import latency_requests
from darl_lite import Scorer, SessionConfig
from darl_lite.scorer import PairScore, flatten_query
from darl_lite.small_call import SMALL_CALL_PAIRS


def _row_path(scorer: Scorer, queries: list[str], items: list[str], outputs: Any) -> list[PairScore]:
    results = scorer._small_call(queries, items, outputs)  # whatever the size: what rows would cost
    if results is None:
        raise SystemExit("the row plan declined this request (a shifted query?): pick another bundle")
    return results


def after_run(scorer: Scorer, query: str, items: list[str], reps: int) -> dict[str, float]:
    """Median µs of the work after the model pass, each timed right after a run, paths alternating."""
    flat = flatten_query(query, items)
    model = scorer.model
    plan = model.plan(flat.queries, flat.items)
    paths: dict[str, Callable[[Any], list[PairScore]]] = {
        "array path": lambda out: scorer._to_results(scorer.finish_arrays(flat.queries, flat.items, out)),
        "row path": lambda out: _row_path(scorer, flat.queries, flat.items, out),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(reps):
        for name in list(paths) if rep % 2 else list(paths)[::-1]:
            outputs = model.run_plan(plan)
            started = time.perf_counter()
            paths[name](outputs)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def whole_calls(scorer: Scorer, query: str, items: list[str], calls: int, rounds: int) -> dict[str, Any]:
    """Whole calls of both paths in blocks of ``calls`` that take turns; medians and block ratios."""
    flat = flatten_query(query, items)
    paths: dict[str, Callable[[], list[PairScore]]] = {
        "array path": lambda: scorer._to_results(scorer.score_arrays(flat.queries, flat.items)),
        "row path": lambda: scorer.score(query, items),
    }
    for call in paths.values():
        for _ in range(max(1, calls // 10)):
            call()
    times: dict[str, list[float]] = {name: [] for name in paths}
    blocks: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        for name in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            block = []
            for _ in range(calls):
                started = time.perf_counter()
                paths[name]()
                block.append(time.perf_counter() - started)
            times[name] += block
            blocks[name].append(statistics.median(block))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratios = [a / r for a, r in zip(blocks["array path"], blocks["row path"], strict=True)]
    speed_up = medians["array path"] / medians["row path"]
    return {"median_ms": medians, "speed_up": speed_up, "block_ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 10, 16, 32])
    parser.add_argument("--reps", type=int, default=300, help="after-run samples per path")
    parser.add_argument("--calls", type=int, default=200, help="calls per whole-call block")
    parser.add_argument("--rounds", type=int, default=8, help="whole-call blocks per path")
    args = parser.parse_args(argv)
    scorer = Scorer.load(args.bundle, session=SessionConfig(intra_op_threads=args.threads))
    requests = latency_requests(tuple(args.sizes))
    out: dict[str, Any] = {"threads": args.threads, "small_call_pairs": SMALL_CALL_PAIRS, "sizes": {}}
    for n in args.sizes:
        query, items = requests[n]
        items = list(items)
        flat = flatten_query(query, items)
        row = scorer.score(query, items)
        if row != scorer._to_results(scorer.score_arrays(flat.queries, flat.items)):
            raise SystemExit(f"{n} items: the row path and the array path answered differently")
        case: dict[str, Any] = {"after_run_us": after_run(scorer, query, items, args.reps)}
        line = f"{n} items, {args.threads} thread(s): after the run (µs) {case['after_run_us']}"
        if n <= SMALL_CALL_PAIRS:  # a larger call takes the array path either way
            calls = max(1, args.calls // n)
            whole = case["whole_call"] = whole_calls(scorer, query, items, calls, args.rounds)
            ratios = ", ".join(f"{x:.2f}" for x in whole["block_ratios"])
            line += f"; whole call (ms) {whole['median_ms']}, x{whole['speed_up']:.3f} (blocks {ratios})"
        out["sizes"][str(n)] = case
        print(line, flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
