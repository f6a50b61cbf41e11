"""Small requests (1 and 10 items): the runtime's levers, alone and beside a neighbouring session.

    python -m bench.small_requests --bundle darl-lite-run/bundle --student darl-lite-run/student \
        --threads 2 --out bench/results/small_t2.json

One process, the latency suites' real id_test requests (``bench.common.latency_requests``). Two
layouts, as issue 16 asks:

* ``alone`` — each contender timed in blocks of ``--reps`` calls, blocks of all contenders
  alternating for ``--rounds`` rounds; median per call.
* ``neighbour`` — darl-lite and sentence-transformers' int8 export (the peer) called in turn,
  request by request, as on a node whose scorer sits beside another onnxruntime session; each
  side's median per call.

Contenders: the runtime as shipped; the runtime without its length cut
(``inference.RUN_COST_TOKENS = 0``: batches of 32 only, each padded to its longest pair); the
runtime with onnxruntime's spinning off (``SessionConfig(spinning=False)``); the raw session on
pre-tokenised feeds (the floor); ST's int8 export.

``run_cost``: onnxruntime's fixed cost of one run, from raw-session timings of synthetic batches
(rows x width) fitted to ``c0 + c1 * rows * width``, and ``c0`` in padded tokens (``c0 / c1``): the
figure behind ``darl_lite.inference.RUN_COST_TOKENS``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ContenderFactory,
    RawSession,
    _raw_call,
    latency_requests,
    prepare_st_models,
    st_int8_label,
    thread_env,
)
from darl_lite import Scorer, SessionConfig, inference

SIZES = (1, 10, 100)


def _time(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _no_length_cut(scorer: Scorer) -> Callable[[str, list[str]], Any]:
    """The runtime's score with batches of ``batch_size`` only (no cut before longer pairs)."""

    def score(query: str, items: list[str]) -> Any:
        kept = inference.RUN_COST_TOKENS
        inference.RUN_COST_TOKENS = 0
        try:
            return scorer.score(query, items)
        finally:
            inference.RUN_COST_TOKENS = kept

    return score


def run_cost(bundle: Path, threads: int, reps: int = 40) -> dict[str, float]:
    """onnxruntime's fixed cost per run on the bundle's int8 graph, in ms and in padded tokens."""
    import numpy as np

    raw = RawSession(bundle, threads)
    names = raw.helper.input_names
    shapes = [(r, w) for r in (1, 2, 4, 8, 16, 32) for w in (8, 12, 16, 24, 32)]
    medians = []
    for rows, width in shapes:
        ids = np.full((rows, width), 1000, np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds = {k: feeds[k] for k in names}
        for _ in range(3):
            raw.session.run(raw.output_names, feeds)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            raw.session.run(raw.output_names, feeds)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    design = np.asarray([[1.0, r * w] for r, w in shapes])
    (c0, c1), *_ = np.linalg.lstsq(design, 1e3 * np.asarray(medians), rcond=None)
    return {"c0_ms": float(c0), "ms_per_padded_token": float(c1), "c0_tokens": float(c0 / c1)}


def contenders(args: argparse.Namespace, query: str, items: list[str]) -> dict[str, Callable[[], Any]]:
    threads = args.threads
    shipped = Scorer.load(args.bundle, session=SessionConfig(intra_op_threads=threads))
    no_spin = Scorer.load(args.bundle, session=SessionConfig(intra_op_threads=threads, spinning=False))
    no_cut = _no_length_cut(shipped)
    st_dir = prepare_st_models(args.student, args.work.resolve(), shipped.bundle.max_length)
    factory = ContenderFactory(args.bundle, st_dir, shipped.bundle.max_length)
    return {
        "darl-lite int8 (shipped)": lambda: shipped.score(query, items),
        "darl-lite int8, no length cut": lambda: no_cut(query, items),
        "darl-lite int8, spinning off": lambda: no_spin.score(query, items),
        "raw session, pre-tokenised (floor)": _raw_call(RawSession(args.bundle, threads), query, items),
        st_int8_label(): factory.prepare("st_onnx_int8", threads, query, items),
    }


def alone(calls: dict[str, Callable[[], Any]], reps: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for name in names:  # warm-up
        for _ in range(5):
            calls[name]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].extend(_time(calls[name]) for _ in range(reps))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def neighbour(ours: Callable[[], Any], peer: Callable[[], Any], reps: int) -> dict[str, float]:
    mine, theirs = [], []
    for _ in range(reps):
        mine.append(_time(ours))
        theirs.append(_time(peer))
    return {"darl-lite": 1e3 * statistics.median(mine), "peer": 1e3 * statistics.median(theirs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of ``args.sizes``; the JSON (``--out``) is rewritten after each, so a run stopped
    early keeps what it measured."""
    requests = latency_requests(tuple(args.sizes))
    out: dict[str, Any] = {"threads": args.threads, "reps": args.reps, "rounds": args.rounds, "cases": {}}
    out["run_cost"] = run_cost(args.bundle, args.threads)
    print(json.dumps({"run_cost": out["run_cost"]}))
    for n in args.sizes:
        query, items = requests[n]
        calls = contenders(args, query, items)
        peer_name = st_int8_label()
        peer = calls[peer_name]
        medians = alone(calls, args.reps, args.rounds)
        case: dict[str, Any] = {"alone_ms": medians}
        case["alone_ratio_vs_peer"] = {name: medians[peer_name] / ms for name, ms in medians.items()}
        case["neighbour_ms"] = {
            "shipped": neighbour(calls["darl-lite int8 (shipped)"], peer, args.reps * args.rounds // 2),
            "spinning off": neighbour(
                calls["darl-lite int8, spinning off"], peer, args.reps * args.rounds // 2
            ),
        }
        out["cases"][str(n)] = case
        print(json.dumps({n: case}, indent=1))
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True, help="the student as an HF folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/darl-bench-work"), help="ST exports go here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=100, help="calls per block")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per contender")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="items per request")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if min(args.sizes) < 1:
        parser.error(f"--sizes must be >= 1, got {min(args.sizes)}")
    os.environ.update(thread_env(args.threads))  # the tokenizer's pool too, as bench.run does
    run(args)


if __name__ == "__main__":
    main()
