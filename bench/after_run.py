"""Why a small call's Python work costs more than it does idle: the same work timed right after a run.

    python -m bench.after_run --bundle darl-lite-run/bundle [--reps 300] [--out after_run.json]

Tokenising one pair (the runtime's own :class:`~darl_lite.pair_tokens.PairEncoder`) is timed in a
tight loop ("idle"), and right after an onnxruntime run of a one-pair batch, with a gap of
0 / 200 / 1,000 / 5,000 µs between them, for three session layouts: 2 threads spinning (the
runtime's default), 2 threads with spinning off, and 1 thread (no pool thread at all). If the
spinning pool thread were what slows the work down, the last two layouts would not show it.
The same for the call's whole batch plan (``RelevanceModel.plan``: character cap, tokenising,
sorting, the padded feeds), under ``plan`` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

from bench.common import latency_requests
from darl_lite import SessionConfig
from darl_lite.bundle import load_bundle, model_role
from darl_lite.inference import RelevanceModel

GAPS_US = (0, 200, 1000, 5000)
LAYOUTS = {"2 threads, spinning": (2, True), "2 threads, spinning off": (2, False), "1 thread": (1, True)}


def _wait(gap_us: int) -> None:
    """Busy-wait short gaps (a node's other work), sleep long ones (an idle node)."""
    if gap_us >= 1000:
        time.sleep(gap_us / 1e6)
        return
    end = time.perf_counter() + gap_us / 1e6
    while time.perf_counter() < end:
        pass


def measure(bundle_dir: Path, reps: int, step: str = "tokenise") -> dict[str, dict[str, float]]:
    """Median µs of ``step`` for one pair (``tokenise`` or ``plan``): idle, and after a run with
    each gap, per layout."""
    query, items = latency_requests((1,))[1]
    bundle = load_bundle(bundle_dir)
    out: dict[str, dict[str, float]] = {}
    for name, (threads, spinning) in LAYOUTS.items():
        model = RelevanceModel(
            bundle.path_of(model_role("int8")),
            bundle.path_of("tokenizer"),
            max_length=bundle.max_length,
            session=SessionConfig(intra_op_threads=threads, spinning=spinning),
        )
        feeds = model.plan([query], items).batches[0][1]
        work = partial(model.encoder.encode if step == "tokenise" else model.plan, [query], items)
        row: dict[str, float] = {}
        for gap in GAPS_US:
            times = []
            for _ in range(reps):
                model.session.run(model.output_names, feeds)
                _wait(gap)
                started = time.perf_counter()
                work()
                times.append(time.perf_counter() - started)
            row[f"after_run_gap_{gap}us"] = 1e6 * statistics.median(times)
        idle = []
        for _ in range(reps):
            started = time.perf_counter()
            work()
            idle.append(time.perf_counter() - started)
        row["idle"] = 1e6 * statistics.median(idle)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {
        "unit": "µs per one-pair call of the step, median (layouts: tokenising; plan: the batch plan)",
        "layouts": measure(args.bundle, args.reps),
        "plan": measure(args.bundle, args.reps, "plan"),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
