"""Which graph and session levers make the int8 session faster, measured against the shipped graph.

    python -m bench.graph_levers --bundle darl-lite-run/bundle --out bench/results/levers.json

Variants, all built from the bundle's own fp32 graph with the export's own functions
(``darl_lite.export.fuse.fuse_attention``, ``darl_lite.export.quantize.quantize_int8`` with the
bundle's preset and fp32 exclusions), timed on the same pre-tokenised requests (one real id_test
query, 100 items, the runtime's batches of 32) with the same threads, and checked for argmax
agreement with fp32 on 2,000 dev pairs:

* ``shipped``: the bundle's int8 graph in the runtime's session (fused attention as ``QAttention``,
  onnxruntime's ``SkipLayerNormFusion`` off);
* ``shipped, SkipLayerNormFusion on``: the same graph with every onnxruntime rewrite;
* ``plain int8`` (no attention fusion), in the runtime's session and with every rewrite (the
  runtime before this study);
* ``fused, all fusions``: the transformer optimizer's defaults (SkipLayerNormalization, BiasGelu,
  EmbedLayerNormalization too), then int8 with ``QAttention``, with every rewrite;
* ``fp32``: the reference;
* thread layouts on the shipped graph: one session with 2 intra-op threads (the runtime's), the
  same without spinning, and two 1-thread sessions each running half of the batches concurrently.

Ratios are against ``shipped`` in the same run; medians over ``--reps`` requests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

#: The runtime's session rewrites (SessionConfig's default) and onnxruntime's own (all on).
RUNTIME = ("SkipLayerNormFusion",)
ALL_REWRITES: tuple[str, ...] = ()
#: The transformer optimizer's own defaults for BERT, for the "all fusions" variant.
ALL_FUSIONS = {
    "enable_attention": True,
    "enable_skip_layer_norm": True,
    "enable_bias_skip_layer_norm": True,
    "enable_bias_gelu": True,
    "enable_gelu": True,
    "enable_embed_layer_norm": True,
}


def build_variants(bundle: Path, work: Path, num_heads: int) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (graph, onnxruntime rewrites to skip)."""
    from darl_lite.export.fuse import fuse_attention
    from darl_lite.export.quantize import quantize_int8

    manifest = json.loads((bundle / "manifest.json").read_text())
    fp32 = bundle / "model_fp32.onnx"
    quant = manifest["quantization"]
    hidden = int(manifest["model"]["export"]["hidden_size"])

    def int8(source: Path, name: str) -> Path:
        target = work / f"{name}.onnx"
        quantize_int8(
            source, target, preset=quant["preset"], per_channel=quant["per_channel"],
            exclude_nodes=quant["excluded_nodes"],
        )  # fmt: skip
        return target

    fused_all = work / "fused_all_fp32.onnx"
    fuse_attention(
        fp32, fused_all, model_type="bert", num_heads=num_heads, hidden_size=hidden, switches=ALL_FUSIONS
    )
    plain = int8(fp32, "plain_int8")
    return {
        "shipped": (bundle / "model_int8.onnx", RUNTIME),
        "shipped, SkipLayerNormFusion on": (bundle / "model_int8.onnx", ALL_REWRITES),
        "plain int8 (no attention fusion)": (plain, RUNTIME),
        "plain int8, every rewrite (the runtime before)": (plain, ALL_REWRITES),
        "fused, all fusions, then int8": (int8(fused_all, "fused_all_int8"), ALL_REWRITES),
        "fp32": (fp32, RUNTIME),
    }


def _session(path: Path, threads: int, disabled: Sequence[str] = RUNTIME, spinning: bool = True) -> Any:
    import onnxruntime as ort

    from darl_lite import SessionConfig

    options = SessionConfig(intra_op_threads=threads).session_options()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )


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

    from bench.common import RawSession, latency_requests
    from darl_lite.datasets import load_dbpedia

    splits = load_dbpedia()
    raw = RawSession(args.bundle, args.threads)  # the runtime's tokenizer and batch plan
    query, items = latency_requests((args.items,))[args.items]  # the latency suites' request
    batches = raw.batches(query, items)
    dev = list(splits.dev[:2000])
    plan = raw.helper.plan([p.query for p in dev], [p.item for p in dev])
    dev_index = np.concatenate([index for index, _ in plan.batches])
    dev_feeds = [feeds for _, feeds in plan.batches]

    report: dict[str, Any] = {"query": query, "items": len(items), "threads": args.threads, "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args.bundle, Path(tmp), args.num_heads)
        logits: dict[str, np.ndarray] = {}
        for name, (path, disabled) in variants.items():
            session = _session(path, args.threads, disabled)
            logits[name] = np.empty((len(dev), raw.helper.n_grades or 3), np.float32)
            logits[name][dev_index] = np.concatenate([session.run(["logits"], f)[0] for f in dev_feeds])
            seconds = _median_seconds(lambda s=session: [s.run(None, f) for f in batches], args.reps)
            report["graphs"][name] = {"median_ms": round(seconds * 1e3, 2)}
        for name, entry in report["graphs"].items():
            entry["agreement_vs_fp32"] = float((logits[name].argmax(1) == logits["fp32"].argmax(1)).mean())
            entry["speed_vs_shipped"] = round(
                report["graphs"]["shipped"]["median_ms"] / entry["median_ms"], 3
            )

        shipped = variants["shipped"][0]
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
