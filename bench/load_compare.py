"""darl-lite serve against the peer server under the same load, alternating, in one run.

    python -m bench.load_compare --bundle darl-lite-run/bundle --student darl-lite-run/student \
        --rounds 3 --out bench/results/load_compare.json

Starts both servers on loopback (``darl-lite serve`` with ``--threads``; the peer of
:mod:`bench.peer_server`: sentence-transformers' own int8 export behind FastAPI, same threads),
then runs every case of :mod:`bench.load_server` (10 and 100 items x concurrency 1, 4, 16) against
one server, then the other, for ``--rounds`` rounds, swapping who goes first each round: this
machine is shared and its speed drifts by tens of percent within minutes, so only figures taken
side by side compare. Per case: the median over rounds of throughput and of p99, and the ratio.
Extra darl-lite variants (e.g. ``--no-batching``) can join with ``--variant NAME=ARGS``;
``--sizes`` and ``--concurrency`` pick the cases (default: all six); ``--pairs`` (default) or
``--requests`` sets each case's length, as in :mod:`bench.load_server`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.load_server import add_case_options, case_length, run, run_load


def _wait_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server for {url} did not answer /healthz within {timeout_s:.0f} s")


def servers(args: argparse.Namespace) -> dict[str, list[str]]:
    """Command line of each contender, by name."""
    threads = str(args.threads)
    darl = [sys.executable, "-m", "darl_lite.cli", "serve", str(args.bundle), "--threads", threads]
    peer = [sys.executable, "-m", "bench.peer_server", "--student", str(args.student)]
    peer += ["--bundle", str(args.bundle), "--threads", threads]
    out = {"darl-lite serve": darl, "ST int8 peer": peer}
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        out[f"darl-lite serve {name}"] = [*darl, *extra.split()]
    return out


def compare(args: argparse.Namespace) -> dict[str, Any]:
    commands = servers(args)
    processes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    try:
        for k, (name, command) in enumerate(commands.items()):
            port = args.port + k
            log = open(Path(args.logs) / f"server_{k}.log", "wb")  # noqa: SIM115 - lives with the process
            process = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=log, env=env)
            processes[name] = (process, f"http://127.0.0.1:{port}")
        for process, url in processes.values():
            _wait_up(url, process)
        rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in commands}
        names = list(commands)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                report = run(
                    run_load(
                        processes[name][1],
                        sizes=args.sizes,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        pairs=args.pairs,
                        deadline_s=args.deadline,
                    )
                )
                rounds[name].append(report["cases"])
                print(f"round {r + 1} {name}: done", flush=True)
    finally:
        for process, _ in processes.values():
            process.terminate()
        for process, _ in processes.values():
            process.wait(10)
    return summarise(rounds)


def summarise(rounds: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Median throughput and p99 per case and contender over the rounds, and ratios to the peer."""
    first = next(iter(rounds.values()))[0]
    cases: list[dict[str, Any]] = []
    for key in [(c["items"], c["concurrency"]) for c in first]:
        row: dict[str, Any] = {"items": key[0], "concurrency": key[1]}
        for name, runs in rounds.items():
            hits = [c for run in runs for c in run if (c["items"], c["concurrency"]) == key]
            row[name] = {
                "pairs_per_s": statistics.median(c["pairs_per_s"] for c in hits),
                "p99_ms": statistics.median(c["p99_ms"] for c in hits if c["p99_ms"] is not None),
                "pairs_per_s_rounds": [round(c["pairs_per_s"]) for c in hits],
            }
        cases.append(row)
    return {"rounds": rounds, "cases": cases}


def markdown(summary: dict[str, Any], peer: str = "ST int8 peer") -> str:
    names = [n for n in summary["cases"][0] if n not in ("items", "concurrency")]
    head = "| items | concurrency | " + " | ".join(f"{n} pairs/s (p99 ms)" for n in names)
    head += " | darl-lite / peer |"
    rows = [head, "|" + "---|" * (len(names) + 3)]
    for case in summary["cases"]:
        cells = [f"{case[n]['pairs_per_s']:,.0f} ({case[n]['p99_ms']:,.0f})" for n in names]
        ratio = case["darl-lite serve"]["pairs_per_s"] / case[peer]["pairs_per_s"]
        rows.append(
            f"| {case['items']} | {case['concurrency']} | " + " | ".join(cells) + f" | {ratio:.2f}× |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True, help="the student as an HF folder (the peer)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    add_case_options(parser)
    parser.add_argument("--port", type=int, default=8180, help="first port; one per contender")
    parser.add_argument("--variant", action="append", default=[], help="NAME=EXTRA_SERVE_ARGS, repeatable")
    parser.add_argument("--logs", type=Path, default=Path("/tmp"), help="server logs go here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    case_length(parser, args)
    summary = compare(args)
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
