"""Which graph and thread levers make the int8 session faster, measured against the shipped graph.

    python -m bench.graph_levers --bundle darl-lite-run/bundle --out bench/results/levers.json

Variants, all built from the bundle's own fp32 graph with the export's options (QInt8,
per-channel, full range; head kept fp32), timed on the same pre-tokenised requests (one real
id_test query, 100 items, the runtime's batches of 32) with the same threads, and checked for
argmax agreement with fp32 on 2,000 dev pairs:

* ``shipped``: the bundle's int8 graph (the parity search kept some feed-forward nodes fp32);
* ``all_int8``: every encoder MatMul int8 (what the parity gate refused);
* ``fused`` / ``fused_int8`` / ``fused_int8_attention``: onnxruntime's transformer optimizer first
  (Attention, SkipLayerNorm, BiasGelu fusions), then int8 without / with the fused Attention;
* thread layouts on the shipped graph: one session with 2 intra-op threads (the runtime's), the
  same without spinning, and two 1-thread sessions each running half of the batches concurrently.

Ratios are against ``shipped`` in the same run; medians over ``--reps`` requests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def _quantize(src: Path, dst: Path, exclude: Sequence[str], op_types: Sequence[str]) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=list(op_types),
        extra_options={"DefaultTensorType": 1},  # fused contrib ops defeat shape inference
    )
    return dst


def build_variants(bundle: Path, work: Path, num_heads: int) -> dict[str, Path]:
    from onnxruntime.transformers.optimizer import optimize_model

    manifest = json.loads((bundle / "manifest.json").read_text())
    fp32 = bundle / "model_fp32.onnx"
    shipped_exclusions = manifest["quantization"]["excluded_nodes"]
    export = manifest["model"]["export"]
    fused = work / "fused_fp32.onnx"
    optimize_model(
        str(fp32), model_type="bert", num_heads=num_heads, hidden_size=int(export["hidden_size"])
    ).save_model_to_file(str(fused))
    import onnx

    from darl_lite.export.quantize import head_nodes

    # onnxruntime rewrites a Gemm into "<name>_MatMul" before applying exclusions: name both.
    head = [n for name in head_nodes(onnx.load(str(fp32))) for n in (name, f"{name}_MatMul")]
    exclude = [*head, *shipped_exclusions]
    return {
        "shipped": bundle / "model_int8.onnx",
        "all_int8": _quantize(fp32, work / "all_int8.onnx", head, ("MatMul", "Gather")),
        "fused_int8": _quantize(fused, work / "fused_int8.onnx", exclude, ("MatMul", "Gather")),
        "fused_int8_attention": _quantize(
            fused, work / "fused_int8_attention.onnx", exclude, ("MatMul", "Gather", "Attention")
        ),
        "fp32": fp32,
        "fused_fp32": fused,
    }


def _session(path: Path, threads: int, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_seconds(call: Callable[[], Any], reps: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.graph_levers", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--num-heads", type=int, default=12, help="attention heads (MiniLM-L6: 12)")
    args = parser.parse_args(argv)

    from bench.common import RawSession
    from darl_lite.datasets import load_dbpedia

    splits = load_dbpedia()
    raw = RawSession(args.bundle, args.threads)  # the runtime's tokenizer and batch plan
    by_query: dict[str, list[str]] = defaultdict(list)
    for pair in splits.id_test:
        by_query[pair.query].append(pair.item)
    query = max(by_query, key=lambda q: len(by_query[q]))
    items = (by_query[query] * (args.items // len(by_query[query]) + 1))[: args.items]
    batches = raw.batches(query, items)
    dev = list(splits.dev[:2000])
    dev_feeds = []
    plan = raw.helper.plan([p.query for p in dev], [p.item for p in dev])
    dev_index = np.concatenate([index for index, _ in plan.batches])
    dev_feeds = [feeds for _, feeds in plan.batches]

    report: dict[str, Any] = {"query": query, "items": len(items), "threads": args.threads, "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args.bundle, Path(tmp), args.num_heads)
        logits: dict[str, np.ndarray] = {}
        for name, path in variants.items():
            session = _session(path, args.threads)
            logits[name] = np.empty((len(dev), raw.helper.n_grades or 3), np.float32)
            logits[name][dev_index] = np.concatenate([session.run(["logits"], f)[0] for f in dev_feeds])
            seconds = _median_seconds(lambda s=session: [s.run(None, f) for f in batches], args.reps)
            report["graphs"][name] = {"median_ms": round(seconds * 1e3, 2)}
        for name, entry in report["graphs"].items():
            entry["agreement_vs_fp32"] = float((logits[name].argmax(1) == logits["fp32"].argmax(1)).mean())
            entry["speed_vs_shipped"] = round(
                report["graphs"]["shipped"]["median_ms"] / entry["median_ms"], 3
            )

        shipped = variants["shipped"]
        one = _session(shipped, args.threads)
        no_spin = _session(shipped, args.threads, spinning=False)
        singles = [_session(shipped, 1) for _ in range(args.threads)]
        pool = ThreadPoolExecutor(args.threads)

        def split_run() -> None:
            shares = [batches[i :: args.threads] for i in range(args.threads)]
            list(pool.map(lambda k: [singles[k].run(None, f) for f in shares[k]], range(args.threads)))

        layouts = {
            f"1 session x {args.threads} threads (runtime)": lambda: [one.run(None, f) for f in batches],
            f"1 session x {args.threads} threads, no spinning": lambda: [
                no_spin.run(None, f) for f in batches
            ],
            f"{args.threads} sessions x 1 thread, batches split": split_run,
        }
        base = None
        report["layouts"] = {}
        for name, call in layouts.items():
            seconds = _median_seconds(call, args.reps)
            base = base or seconds
            report["layouts"][name] = {
                "median_ms": round(seconds * 1e3, 2),
                "speed_vs_runtime": round(base / seconds, 3),
            }
        pool.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
