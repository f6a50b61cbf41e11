"""Which graph and session levers make the int8 session faster, measured against the shipped graph.

    python -m bench.graph_levers --bundle darl-lite-run/bundle --out bench/results/levers.json
    python -m bench.graph_levers --bundle darl-lite-run/bundle --out bench/results/levers.json --static

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
  same without spinning, and two 1-thread sessions each running half of the batches concurrently;
* static int8 (activation scales calibrated once, on ``--calib-pairs`` train pairs tokenised and
  batched the runtime's way), the OOD nodes fp32 as in the shipped graph:

  * ``static QDQ``: onnxruntime's ``quantize_static`` (QDQ, per-channel QInt8 weights, QUInt8
    activations, MinMax, MatMuls, the bundle's fp32 exclusions) on the unfused fp32 graph; the
    fused ``Attention`` has no static quantizer (``QAttention`` is dynamic-only in onnxruntime);
  * ``static scales``: ``quantize_int8(mode="static")`` of the fused graph (the export's static
    mode: the dynamic graph with each ``DynamicQuantizeLinear`` a ``QuantizeLinear`` at a fixed
    scale, each int8 product a ``MatMulIntegerToFloat``), with the bundle's exclusions, and with
    the head alone fp32 (what ``ExportConfig(quant_mode="static")`` ships when its gate passes);
  * ``dynamic, head only fp32``: the dynamic graph without the sensitivity exclusions, for contrast.

``--first-token`` adds the static head-only graph with its last layer on every token
(``darl_lite.export.first_token`` not applied) and times it against the same graph trimmed
(``first_token_study``); the table gives both graphs' agreement with fp32, and
``first_token_max_abs_logit_diff`` their largest logit difference on the dev pairs.
``--static`` also times ``shipped`` against the two static-scales graphs at 1, 10, 100 and 1000
items with 1 and 2 threads in alternating rounds (``static_study`` in the JSON, timed by
``alternating_study``). ``--fast-gelu`` does the same for the GELU approximation
(``fast_gelu_study``): the shipped graph as onnxruntime optimises it (its ``Gelu`` fused from the
exported ``Erf`` form) against the same graph with each ``Gelu`` onnxruntime's tanh approximation
``FastGelu`` (the transformer optimizer's ``enable_gelu_approximation``); both also join the table
with their agreement. Every graph's ``batch_dependence`` is the largest |logit| difference between
a dev pair scored alone and in its batch: dynamic activation scales depend on the other pairs of
the batch, static ones do not.

Every int8 variant runs its last layer on the first token when the shipped graph does
(``darl_lite.export.first_token``, applied as the export applies it), so each differs from
``shipped`` only in its lever. Ratios are against ``shipped`` in the same run; medians over
``--reps`` requests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

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


#: The static-scales variants (see the module docstring).
STATIC_SAME = "static scales, the bundle's fp32 exclusions"
STATIC_HEAD = "static scales, head only fp32 (quant_mode='static')"
OOD_PREFIX = "darl_ood/"  # darl_lite.export.ood_graph's node names: its MatMul stays fp32


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prebuilt feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def static_qdq(
    fp32: Path, target: Path, feeds: Sequence[dict[str, np.ndarray]], excluded: Sequence[str]
) -> Path:
    """onnxruntime ``quantize_static`` of the unfused fp32 graph: QDQ, MinMax, per-channel MatMuls."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node]
    keep = [*excluded, *(n + "_MatMul" for n in excluded), *(n for n in nodes if n.startswith(OOD_PREFIX))]
    quantize_static(
        str(fp32), str(target), _Reader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=keep, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip
    return target


def build_variants(
    bundle: Path,
    work: Path,
    num_heads: int,
    calibration: Sequence[dict[str, np.ndarray]] = (),
    every_row: bool = False,
) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (graph, onnxruntime rewrites to skip); the static variants only with ``calibration``,
    and with ``every_row`` also the static head-only graph with its last layer on every token."""
    import onnx

    from bench.common import int8_first_token
    from darl_lite.export.first_token import trim_to_first_token
    from darl_lite.export.fuse import fuse_attention
    from darl_lite.export.quantize import head_nodes, quantize_int8

    manifest = json.loads((bundle / "manifest.json").read_text())
    fp32 = bundle / "model_fp32.onnx"
    quant = manifest["quantization"]
    hidden = int(manifest["model"]["export"]["hidden_size"])
    first_token = int8_first_token(manifest)

    def as_shipped(graph: Path) -> Path:
        """An int8 variant with the shipped graph's last layer on the first token, where it has one."""
        if first_token:
            trim_to_first_token(graph, graph)
        return graph

    def int8(source: Path, name: str) -> Path:
        target = work / f"{name}.onnx"
        quantize_int8(
            source, target, preset=quant["preset"], per_channel=quant["per_channel"],
            exclude_nodes=quant["excluded_nodes"],
        )  # fmt: skip
        return as_shipped(target)

    fused_all = work / "fused_all_fp32.onnx"
    fuse_attention(
        fp32, fused_all, model_type="bert", num_heads=num_heads, hidden_size=hidden, switches=ALL_FUSIONS
    )
    plain = int8(fp32, "plain_int8")
    static: dict[str, tuple[Path, tuple[str, ...]]] = {}
    if calibration:
        excluded = quant["excluded_nodes"]
        fused = work / "fused_fp32.onnx"
        fuse_attention(fp32, fused, model_type="bert", num_heads=num_heads, hidden_size=hidden)
        model = onnx.load(str(fp32), load_external_data=False)
        ood = [n.name for n in model.graph.node if n.name.startswith(OOD_PREFIX) and n.op_type == "MatMul"]
        heads = head_nodes(model)

        def int8_of(
            name: str, keep: Sequence[str], mode: Literal["dynamic", "static"], trim: bool = True
        ) -> Path:
            target = work / f"{name}.onnx"
            quantize_int8(
                fused, target, preset=quant["preset"], per_channel=quant["per_channel"],
                exclude_nodes=[*keep, *ood], mode=mode, calibration=calibration if mode == "static" else None,
            )  # fmt: skip
            return as_shipped(target) if trim else target

        static = {
            "static QDQ (quantize_static, MinMax), unfused": (
                as_shipped(static_qdq(fp32, work / "static_qdq.onnx", calibration, excluded)),
                RUNTIME,
            ),
            STATIC_SAME: (int8_of("static_same", excluded, "static"), RUNTIME),
            STATIC_HEAD: (int8_of("static_head", heads, "static"), RUNTIME),
            "dynamic, head only fp32": (int8_of("dynamic_head", heads, "dynamic"), RUNTIME),
        }
        if every_row:
            static[EVERY_ROW] = (int8_of("static_head_every_row", heads, "static", trim=False), RUNTIME)
    return {
        "shipped": (bundle / "model_int8.onnx", RUNTIME),
        "shipped, SkipLayerNormFusion on": (bundle / "model_int8.onnx", ALL_REWRITES),
        "plain int8 (no attention fusion)": (plain, RUNTIME),
        "plain int8, every rewrite (the runtime before)": (plain, ALL_REWRITES),
        "fused, all fusions, then int8": (int8(fused_all, "fused_all_int8"), ALL_REWRITES),
        **static,
        "fp32": (fp32, RUNTIME),
    }


EVERY_ROW = "static scales, head only fp32, last layer on every token"
GELU_EXACT = "shipped as onnxruntime optimises it (exact Gelu)"
GELU_FAST = "shipped, each Gelu as FastGelu (tanh approximation)"


def gelu_variants(shipped: Path, work: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """The shipped graph after onnxruntime's own rewrites (the runtime's session), as is and with
    each fused ``Gelu`` (exact, erf) turned into ``FastGelu`` (tanh): one op apart, so the timing
    difference is the approximation's alone. Static activation scales stay those of exact GELU."""
    import onnx
    import onnxruntime as ort

    from darl_lite import SessionConfig

    exact, fast = work / "gelu_exact.onnx", work / "gelu_fast.onnx"
    options = SessionConfig(intra_op_threads=1).session_options()
    options.optimized_model_filepath = str(exact)
    providers = ["CPUExecutionProvider"]
    ort.InferenceSession(str(shipped), options, providers=providers, disabled_optimizers=list(RUNTIME))
    model = onnx.load(str(exact))
    turned = 0
    for node in model.graph.node:
        if node.op_type == "Gelu" and node.domain == "com.microsoft":
            node.op_type, turned = "FastGelu", turned + 1
    if not turned:
        raise ValueError(f"onnxruntime fused no Gelu in {shipped}: nothing to approximate")
    onnx.save(model, str(fast))
    return {GELU_EXACT: (exact, RUNTIME), GELU_FAST: (fast, RUNTIME)}


def _session(path: Path, threads: int, disabled: Sequence[str] = RUNTIME, spinning: bool = True) -> Any:
    import onnxruntime as ort

    from darl_lite import SessionConfig

    options = SessionConfig(intra_op_threads=threads).session_options()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )


def _run_all(session: Any, batches: Sequence[dict[str, np.ndarray]]) -> list[Any]:
    return [session.run(None, f) for f in batches]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def _median_seconds(call: Callable[[], Any], reps: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def alternating_study(
    graphs: dict[str, Path], requests: dict[int, list[dict[str, np.ndarray]]], rounds: int, budget_s: float
) -> dict[str, Any]:
    """Median ms per request of each graph (the first is the reference) per thread count and size,
    in alternating rounds: each round runs every graph ``per_round`` times, starting one further on."""
    study: dict[str, Any] = {}
    names = list(graphs)
    for threads in (1, 2):
        sessions = {name: _session(path, threads) for name, path in graphs.items()}
        for size, batches in requests.items():
            calls = {name: partial(_run_all, s, batches) for name, s in sessions.items()}
            for call in calls.values():
                call()
            started = time.perf_counter()
            calls[names[0]]()
            per_round = max(1, int(budget_s / max(time.perf_counter() - started, 1e-6)))
            times: dict[str, list[float]] = {name: [] for name in calls}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    for _ in range(per_round):
                        started = time.perf_counter()
                        calls[name]()
                        times[name].append(time.perf_counter() - started)
            medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            key = f"{threads} thread(s), {size} items"
            study[key] = {
                name: {"median_ms": round(ms, 3), "speed_vs_first": round(medians[names[0]] / ms, 3)}
                for name, ms in medians.items()
            }
            study[key]["requests_each"] = rounds * per_round
            print(
                key,
                {name: (round(ms, 2), study[key][name]["speed_vs_first"]) for name, ms in medians.items()},
            )
    return study


def _batch_dependence(session: Any, dev_feeds: Sequence[dict[str, np.ndarray]], batched: np.ndarray) -> float:
    """Largest |logit| change of the first dev batch's pairs scored one at a time instead of together."""
    feed = dev_feeds[0]
    lengths = feed["attention_mask"].sum(1)
    alone = [
        session.run(["logits"], {k: v[i : i + 1, : lengths[i]] for k, v in feed.items()})[0][0]
        for i in range(len(lengths))
    ]
    return float(np.max(np.abs(np.asarray(alone) - batched)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.graph_levers", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--num-heads", type=int, default=12, help="attention heads (MiniLM-L6: 12)")
    parser.add_argument(
        "--calib-pairs", type=int, default=384, help="train pairs for static scales (0: none)"
    )
    parser.add_argument("--static", action="store_true", help="also time static scales at 1-1000 items")
    parser.add_argument(
        "--fast-gelu", action="store_true", help="also time the GELU approximation at 1-1000 items"
    )
    parser.add_argument(
        "--first-token",
        action="store_true",
        help="also time the last layer on the first token against every token at 1-1000 items",
    )
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
    pick = np.random.default_rng(0).choice(
        len(splits.train), min(args.calib_pairs, len(splits.train)), replace=False
    )
    calibration_pairs = [splits.train[i] for i in sorted(pick)] if args.calib_pairs else []
    calibration = [
        feeds
        for _, feeds in raw.helper.plan(
            [p.query for p in calibration_pairs], [p.item for p in calibration_pairs]
        ).batches
    ] if calibration_pairs else []  # fmt: skip

    report: dict[str, Any] = {"query": query, "items": len(items), "threads": args.threads, "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args.bundle, Path(tmp), args.num_heads, calibration, args.first_token)
        if args.fast_gelu:
            variants.update(gelu_variants(args.bundle / "model_int8.onnx", Path(tmp)))
        logits: dict[str, np.ndarray] = {}
        for name, (path, disabled) in variants.items():
            session = _session(path, args.threads, disabled)
            logits[name] = np.empty((len(dev), raw.helper.n_grades or 3), np.float32)
            logits[name][dev_index] = np.concatenate([session.run(["logits"], f)[0] for f in dev_feeds])
            seconds = _median_seconds(partial(_run_all, session, batches), args.reps)
            report["graphs"][name] = {
                "median_ms": round(seconds * 1e3, 2),
                "batch_dependence": _batch_dependence(
                    session, dev_feeds, logits[name][dev_index[: len(dev_feeds[0]["input_ids"])]]
                ),
            }
        for name, entry in report["graphs"].items():
            entry["agreement_vs_fp32"] = float((logits[name].argmax(1) == logits["fp32"].argmax(1)).mean())
            diff = np.abs(_softmax(logits[name]) - _softmax(logits["fp32"]))
            entry["max_abs_prob_diff"], entry["mean_abs_prob_diff"] = float(diff.max()), float(diff.mean())
            entry["speed_vs_shipped"] = round(
                report["graphs"]["shipped"]["median_ms"] / entry["median_ms"], 3
            )

        if EVERY_ROW in logits:
            diff = np.abs(logits[EVERY_ROW] - logits[STATIC_HEAD])
            report["first_token_max_abs_logit_diff"] = float(diff.max())
        shipped = variants["shipped"][0]
        one = _session(shipped, args.threads)
        no_spin = _session(shipped, args.threads, spinning=False)
        singles = [_session(shipped, 1) for _ in range(args.threads)]
        pool = ThreadPoolExecutor(args.threads)
        shares = [batches[i :: args.threads] for i in range(args.threads)]

        def split_run() -> None:
            list(pool.map(lambda k: [singles[k].run(None, f) for f in shares[k]], range(args.threads)))

        def shared_run() -> None:  # one set of weights: onnxruntime's run is safe to call concurrently
            list(pool.map(lambda k: [singles[0].run(None, f) for f in shares[k]], range(args.threads)))

        layouts = {
            f"1 session x {args.threads} threads (runtime)": lambda: [one.run(None, f) for f in batches],
            f"1 session x {args.threads} threads, no spinning": lambda: [
                no_spin.run(None, f) for f in batches
            ],
            f"{args.threads} sessions x 1 thread, batches split": split_run,
            f"1 session x 1 thread called from {args.threads} threads, batches split": shared_run,
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
        static = args.static and STATIC_HEAD in variants
        studies = {
            "static_study": ("shipped", STATIC_SAME, STATIC_HEAD) if static else (),
            "fast_gelu_study": (GELU_EXACT, GELU_FAST) if args.fast_gelu else (),
            "first_token_study": (EVERY_ROW, STATIC_HEAD) if EVERY_ROW in variants else (),
        }
        if any(studies.values()):
            sized = latency_requests((1, 10, 100, 1000))
            requests = {n: raw.batches(*sized[n]) for n in (1, 10, 100, 1000)}
            for study, names in studies.items():
                if names:
                    graphs = {name: variants[name][0] for name in names}
                    report[study] = alternating_study(graphs, requests, rounds=8, budget_s=0.4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
