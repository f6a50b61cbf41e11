"""The machine's measured GEMM throughput: the peak a contender's figure is held against.

    python -m bench.gemm --threads 2 --out gemm_t2.json
    python -m bench.gemm --threads 2 --out gemm_t2.json --recheck   # re-check a file's peaks, no timing

Five kernels, each on the student's own GEMM shapes (M = 32 pairs × 40 tokens; K×N = 384×384,
384×1536, 1536×384) and on a large square one (2048³); the peak of a precision is the best of its
kernels and shapes:

- ``numpy_fp32``: ``numpy.matmul`` (its BLAS; threads set through the environment, so run this module
  in a fresh process per thread budget, as ``bench.run`` does);
- ``ort_fp32``: an onnxruntime ``MatMul`` with the weight as an initializer;
- ``ort_int8_dynamic``: the same graph through ``quantize_dynamic`` (QInt8, per channel), which
  onnxruntime fuses to the dynamic-quantized kernel (activations quantized on the fly, u8×s8 GEMM):
  what sentence-transformers' int8 export runs;
- ``ort_int8_static_float``: ``MatMulIntegerToFloat`` on uint8 inputs with fixed scales, the kernel
  darl-lite's int8 bundles run (their activation scales are static since 2026-12-02; before
  2026-12-07 the probe lacked it, and the model's own products outran the "peak");
- ``ort_int8_static``: ``MatMulInteger`` on inputs already in uint8: the bare u8×s8 kernel.

The int8 peak is the best of the kernels the graphs run (dynamic and static-to-float); the bare
kernel is reported beside it.

GOPS = 2·M·K·N / median seconds.

The measured peaks are then held against the CPU's theoretical ones (:mod:`bench.peak`: cores ×
clock × MACs per cycle of its instruction set): ``measured_peak_gops`` is the best kernel,
``theoretical_peak_gops`` the physical limit, ``peak_check`` says which measured figure is
impossible (above the limit: a timing or kernel artefact, not speed), and ``peak_gops`` — the figure
every "% of peak" rests on — is the checked peak, the smaller of the two.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES: tuple[tuple[int, int, int], ...] = (
    (1280, 384, 384),
    (1280, 384, 1536),
    (1280, 1536, 384),
    (2048, 2048, 2048),
)


def _median_seconds(fn, budget_s: float) -> float:
    fn()
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _save_one_node(path: Path, node, a_type: int, y_type: int, k: int, n: int, inits: list) -> None:
    """A graph of ``node`` alone, input ``A`` (m × k) and output ``Y`` (m × n), saved at ``path``."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", a_type, ["m", k])],
        [helper.make_tensor_value_info("Y", y_type, ["m", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))


def _matmul_model(path: Path, m: int, k: int, n: int, rng: np.random.Generator) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    _save_one_node(path, node, TensorProto.FLOAT, TensorProto.FLOAT, k, n, [weight])


def _integer_model(path: Path, k: int, n: int, rng: np.random.Generator) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W")
    node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
    _save_one_node(path, node, TensorProto.UINT8, TensorProto.INT32, k, n, [weight])


def _integer_to_float_model(path: Path, k: int, n: int, rng: np.random.Generator) -> None:
    """``MatMulIntegerToFloat`` (com.microsoft) with per-column weight scales, as an int8 bundle has it."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W"),
        numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
        numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
    ]
    inputs = ["A", "W", "a_scale", "w_scale", "a_zero", "w_zero"]
    node = helper.make_node("MatMulIntegerToFloat", inputs, ["Y"], domain="com.microsoft")
    _save_one_node(path, node, TensorProto.UINT8, TensorProto.FLOAT, k, n, inits)


def measure(
    threads: int, budget_s: float = 0.6, clock_ghz: float | None = None, ports: int | None = None
) -> dict:
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" advice
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in SHAPES:
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            fp32, int8, to_float, static = (
                Path(tmp) / f"{x}_{k}_{n}.onnx" for x in ("fp32", "dyn", "to_float", "static")
            )
            _matmul_model(fp32, m, k, n, rng)
            quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
            _integer_to_float_model(to_float, k, n, rng)
            _integer_model(static, k, n, rng)
            a_u8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
            kernels = {
                "numpy_fp32": lambda a=a, b=b: np.matmul(a, b),
                "ort_fp32": _runner(fp32, options, {"A": a}),
                "ort_int8_dynamic": _runner(int8, options, {"A": a}),
                "ort_int8_static_float": _runner(to_float, options, {"A": a_u8}),
                "ort_int8_static": _runner(static, options, {"A": a_u8}),
            }
            for kernel, fn in kernels.items():
                seconds = _median_seconds(fn, budget_s)
                rows.append(
                    {
                        "kernel": kernel,
                        "precision": "int8" if "int8" in kernel else "fp32",
                        "m": m,
                        "k": k,
                        "n": n,
                        "seconds": seconds,
                        "gops": 2.0 * m * k * n / seconds / 1e9,
                    }
                )
    measured: dict[str, float] = {
        p: max(float(r["gops"]) for r in rows if r["precision"] == p and r["kernel"] != "ort_int8_static")
        for p in ("fp32", "int8")
    }
    static_peak = max(float(r["gops"]) for r in rows if r["kernel"] == "ort_int8_static")
    check = check_against_theory(measured, static_peak, threads, clock_ghz, ports)
    return {"threads": threads, "rows": rows, **check}


def check_against_theory(
    measured: dict[str, float],
    static_int8: float,
    threads: int,
    clock_ghz: float | None = None,
    ports: int | None = None,
    cpu=None,
) -> dict:
    """The measured peaks beside the theoretical ones; ``peak_gops`` is the checked peak."""
    import logging

    from bench.peak import checked_peaks, cpu_record, read_cpu_info

    cpu = cpu or read_cpu_info()
    check = checked_peaks({**measured, "int8_static": static_int8}, cpu, threads, clock_ghz, ports)
    theory = check["precisions"]
    for precision, row in theory.items():
        if row["impossible"]:
            logging.getLogger(__name__).warning(
                "%s: measured %.0f GOPS is %.1fx the theoretical peak %.0f: impossible, not used",
                precision,
                row["measured"],
                row["ratio"],
                row["theoretical"],
            )
    return {
        "cpu": cpu_record(cpu),
        "measured_peak_gops": measured,
        "measured_peak_gops_static_int8": static_int8,
        "theoretical_peak_gops": {p: theory[p]["theoretical"] for p in ("fp32", "int8")},
        "peak_check": check,
        "peak_gops": {p: theory[p]["checked"] for p in ("fp32", "int8")},
        "peak_gops_static_int8": theory["int8_static"]["checked"],
    }


def recheck(path: Path, clock_ghz: float | None = None, ports: int | None = None) -> dict:
    """A results file's measured peaks checked again against the CPU that measured them.

    That CPU is the file's ``cpu`` record; a file written before the record existed is checked
    against the machine line of ``run.json`` beside it (``bench.run``), else against this machine.
    """
    import logging

    from bench.peak import cpu_from_machine_line, cpu_from_record, read_cpu_info

    old = json.loads(path.read_text())
    run_json = path.parent / "run.json"
    if "cpu" in old:
        cpu = cpu_from_record(old["cpu"])
    elif run_json.is_file() and "machine" in json.loads(run_json.read_text()):
        cpu = cpu_from_machine_line(json.loads(run_json.read_text())["machine"])
    else:
        logging.getLogger(__name__).warning("%s records no CPU: checking against this machine's", path)
        cpu = read_cpu_info()
    measured = old.get("measured_peak_gops", old["peak_gops"])
    static = old.get("measured_peak_gops_static_int8", old["peak_gops_static_int8"])
    return {**old, **check_against_theory(measured, static, old["threads"], clock_ghz, ports, cpu)}


def _runner(path: Path, options, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timed runs per kernel/shape")
    parser.add_argument(
        "--clock-ghz", type=float, default=None, help="the cores' real (boost) clock, if the kernel hides it"
    )
    parser.add_argument(
        "--ports", type=int, default=None, help="512-bit VNNI ports per core, if not the model's default"
    )
    parser.add_argument(
        "--recheck", action="store_true", help="re-check the peaks of an existing --out file, measure nothing"
    )
    args = parser.parse_args()
    if args.recheck:
        result = recheck(args.out, args.clock_ghz, args.ports)
    else:
        result = measure(args.threads, args.budget, args.clock_ghz, args.ports)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
