"""Run every benchmark suite and write the report: one command, about 15–20 minutes on 2 cores.

    python -m bench.run --bundle /tmp/qs_ref/bundle --student /tmp/qs_ref/student --out bench/results

Stages (each a fresh process with its thread budget set in the environment as well as in code):
``tokens`` (token lengths and FLOPs of the latency requests), ``st`` (sentence-transformers' ONNX and
dynamic-quantized exports of the student, into ``--work``), ``gemm`` (GEMM peak per thread budget),
``latency`` (the pytest-benchmark suite, one process per thread budget), ``memory`` (peak RSS,
import and load time), ``quality`` (quality suite), ``profile`` (where ``score`` spends its time),
``report`` (results.json, report.md, plots). ``--stages`` re-runs a subset; ``--quick`` shrinks
every stage to check the plumbing in a couple of minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    SIZES,
    THREADS,
    EncoderShape,
    latency_requests,
    prepare_st_models,
    thread_env,
    token_stats,
)

STAGES = ("tokens", "st", "gemm", "latency", "memory", "quality", "profile", "report")
ROOT = Path(__file__).resolve().parent.parent


def _sh(cmd: list[str], env: dict[str, str], log: Path) -> None:
    print(f"  $ {shlex.join(cmd)}", flush=True)
    with log.open("a") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}")


def _machine() -> str:
    model = "unknown CPU"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy
    import onnxruntime
    import tokenizers

    versions = (
        f"numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"tokenizers {tokenizers.__version__}"
    )
    try:
        import sentence_transformers
        import torch

        versions += f", torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}"
    except ImportError:
        pass
    return (
        f"{os.cpu_count()} vCPUs of {model} ({', '.join(isa)}), {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, {versions}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, required=True, help="a darl-lite bundle (int8 and fp32 graphs)"
    )
    parser.add_argument(
        "--student", type=Path, default=None, help="the student as an HF folder (ST contenders)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/darl-bench-work"), help="ST exports go here")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per latency case")
    parser.add_argument(
        "--blocks",
        type=int,
        default=4,
        help="blocks per latency case, taking turns with the other contenders' (1: one block each)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts everywhere: checks the plumbing")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    if args.blocks < 1:
        parser.error(f"--blocks must be >= 1, got {args.blocks}")
    out, bundle = args.out.resolve(), args.bundle.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    py = sys.executable
    sizes = (1, 10, 100) if args.quick else SIZES
    started, t0 = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    run_info = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    run_info.update(
        command=shlex.join(["python", "-m", "bench.run", *sys.argv[1:]]),
        started=started,
        load_before=round(os.getloadavg()[0], 2),
        machine=_machine(),
        quick=args.quick,
    )
    # A full run starts a fresh log; a subset of stages adds to the log of the run it completes.
    with log.open("w" if set(stages) == set(STAGES) else "a") as handle:
        handle.write(f"# {started} {run_info['command']}\n")
    timings: dict[str, float] = run_info.setdefault("stage_seconds", {})
    st_dir = args.work.resolve() / "st_student" if args.student else None

    for stage in stages:
        print(f"[{stage}] load {os.getloadavg()[0]:.2f}", flush=True)
        s0 = time.perf_counter()
        if stage == "tokens":
            shape = EncoderShape.from_config(args.student / "config.json") if args.student else EncoderShape()
            stats = token_stats(bundle, latency_requests(sizes), shape)
            (out / "tokens.json").write_text(json.dumps(stats, indent=2) + "\n")
        elif stage == "st" and args.student:
            from darl_lite.bundle import load_bundle

            os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            prepare_st_models(args.student, args.work.resolve(), load_bundle(bundle, verify=False).max_length)
        elif stage == "gemm":
            for t in THREADS:
                budget = "0.1" if args.quick else "0.8"
                cmd = [py, "-m", "bench.gemm", "--threads", str(t), "--out", str(out / f"gemm_t{t}.json")]
                _sh([*cmd, "--budget", budget], thread_env(t), log)
        elif stage == "latency":
            for t in THREADS:
                env = thread_env(t) | {
                    "DARL_LITE_BUNDLE": str(bundle),
                    "DARL_BENCH_THREADS": str(t),
                    "DARL_BENCH_SIZES": ",".join(map(str, sizes)),
                    "DARL_BENCH_SECONDS": str(0.3 if args.quick else args.seconds),
                    "DARL_BENCH_BLOCKS": str(args.blocks),
                }
                if st_dir:
                    env["DARL_BENCH_ST_DIR"] = str(st_dir)
                loads = run_info.setdefault("load_latency_pass", {})
                loads[f"t{t}_before"] = round(os.getloadavg()[0], 2)
                cmd = [
                    py,
                    "-m",
                    "pytest",
                    "bench/test_latency.py",
                    "--benchmark-only",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                ]
                _sh([*cmd, f"--benchmark-json={out / f'latency_t{t}.json'}"], env, log)
                loads[f"t{t}_after"] = round(os.getloadavg()[0], 2)
        elif stage == "memory":
            extra = ["--pairs", "1000", "--repeats", "3"] if args.quick else []
            _sh(
                [
                    py,
                    "-m",
                    "bench.memory",
                    "--bundle",
                    str(bundle),
                    "--out",
                    str(out / "memory.json"),
                    *extra,
                ],
                thread_env(2),
                log,
            )
        elif stage == "quality":
            cmd = [py, "-m", "bench.quality", "--bundle", str(bundle), "--out", str(out / "quality.json")]
            if st_dir:
                cmd += ["--st-dir", str(st_dir)]
            if args.quick:
                cmd += ["--max-queries", "5", "--repeats", "2"]
            _sh(cmd, thread_env(2), log)
        elif stage == "profile":
            reps = "5" if args.quick else "40"
            _sh(
                [
                    py,
                    "-m",
                    "bench.profile_score",
                    "--bundle",
                    str(bundle),
                    "--out",
                    str(out / "profile.json"),
                    "--reps",
                    reps,
                ],
                thread_env(2),
                log,
            )
        elif stage == "report":
            run_info.update(load_after=round(os.getloadavg()[0], 2), wall_s=time.perf_counter() - t0)
            (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
            from bench.report import build

            build(out)
        timings[stage] = round(time.perf_counter() - s0, 1)
        run_info.setdefault("load_by_stage", {})[stage] = round(os.getloadavg()[0], 2)
        print(f"[{stage}] done in {timings[stage]:.0f} s", flush=True)
    run_info.update(load_after=round(os.getloadavg()[0], 2), wall_s=time.perf_counter() - t0)
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    print(f"wrote {out / 'report.md'} in {run_info['wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
