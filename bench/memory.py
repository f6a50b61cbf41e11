"""Memory and start-up: peak RSS of a node process, ``import darl_lite`` time, bundle load time.

    python -m bench.memory --bundle B --out memory.json

Every figure comes from a fresh Python process (``python -m bench.memory --child ...``) so nothing
the parent imported or cached counts:

- ``rss``: import darl_lite, load the bundle, score 10,000 real pairs (id_test then ood_test; the
  pairs are handed over in a JSON file so loading the dataset costs the child nothing), then report
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, with VmRSS after import and after load. Two shapes
  of traffic: one ``score`` call per query (a search node) and all 10,000 pairs in one call.
- ``import``: ``import darl_lite`` wall time (median of ``--repeats`` processes), whether torch got
  imported, and the slowest modules from one ``python -X importtime`` run.
- ``load``: ``load_bundle`` with sha256 verification, without, and ``Scorer`` construction
  (median of ``--repeats`` processes, page cache warm after the first).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import thread_env


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_rss(bundle: str, pairs_file: str, precision: str, mode: str, threads: int) -> dict:
    import resource

    started = time.perf_counter()
    import darl_lite

    imported = time.perf_counter() - started
    rss_import = _vm_rss_mb()
    requests = json.loads(Path(pairs_file).read_text())
    started = time.perf_counter()
    scorer = darl_lite.Scorer.load(
        bundle, precision=precision, session=darl_lite.SessionConfig(intra_op_threads=threads)
    )
    loaded = time.perf_counter() - started
    rss_load = _vm_rss_mb()
    started = time.perf_counter()
    n = 0
    if mode == "per_query":
        for query, items in requests:
            n += len(scorer.score(query, items))
    else:
        queries = [q for q, items in requests for _ in items]
        items = [i for _, its in requests for i in its]
        n = len(scorer.score_arrays(queries, items).probabilities)
    scored = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "precision": precision,
        "mode": mode,
        "pairs": n,
        "import_s": imported,
        "load_s": loaded,
        "score_s": scored,
        "rss_after_import_mb": rss_import,
        "rss_after_load_mb": rss_load,
        "peak_rss_mb": peak,
        "torch_imported": "torch" in sys.modules,
    }


def child_import() -> dict:
    started = time.perf_counter()
    import darl_lite  # noqa: F401

    return {"import_s": time.perf_counter() - started, "torch_imported": "torch" in sys.modules}


def child_load(bundle: str) -> dict:
    from darl_lite import Scorer, SessionConfig
    from darl_lite.bundle import load_bundle

    t = time.perf_counter()
    b = load_bundle(bundle, verify=True)
    verified = time.perf_counter() - t
    t = time.perf_counter()
    load_bundle(bundle, verify=False)
    unverified = time.perf_counter() - t
    out = {"load_bundle_verify_s": verified, "load_bundle_noverify_s": unverified}
    for precision in ("int8", "fp32"):
        t = time.perf_counter()
        Scorer(b, precision=precision, session=SessionConfig(intra_op_threads=2))
        out[f"scorer_{precision}_s"] = time.perf_counter() - t
    return out


def _child(args: list[str], threads: int | None = 2) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--child", *args]
    done = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _importtime_top(k: int = 8) -> list[dict]:
    """Top-level packages by cumulative import time, from one ``python -X importtime`` run."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import darl_lite"],
        env=thread_env(2),
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[dict[str, Any]] = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m and "." not in m.group(3):
            rows.append({"module": m.group(3), "cum_ms": int(m.group(2)) / 1e3})
    return sorted(rows, key=lambda r: -r["cum_ms"])[:k]


def measure(bundle: Path, n_pairs: int = 10_000, repeats: int = 7, threads: int = 2) -> dict:
    from darl_lite.datasets import load_dbpedia

    data = load_dbpedia(fold=0)
    requests: dict[str, list[str]] = {}
    count = 0
    for p in [*data.id_test, *data.ood_test]:
        if count == n_pairs:
            break
        requests.setdefault(p.query, []).append(p.item)
        count += 1
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(list(requests.items()), handle)
        pairs_file = handle.name
    try:
        rss = [
            _child(["rss", str(bundle), pairs_file, precision, mode, str(threads)], threads)
            for precision, mode in (("int8", "per_query"), ("int8", "one_call"), ("fp32", "per_query"))
        ]
    finally:
        Path(pairs_file).unlink()
    imports = [_child(["import"]) for _ in range(repeats)]
    loads = [_child(["load", str(bundle)]) for _ in range(repeats)]
    return {
        "pairs": count,
        "queries": len(requests),
        "threads": threads,
        "rss": rss,
        "import": {
            "median_s": statistics.median(r["import_s"] for r in imports),
            "runs_s": [r["import_s"] for r in imports],
            "torch_imported": any(r["torch_imported"] for r in imports),
            "slowest_modules": _importtime_top(),
        },
        "load": {key: statistics.median(r[key] for r in loads[1:] or loads) for key in loads[0]}
        | {"first_process": loads[0]},
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "rss":
            result = child_rss(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
        elif kind == "import":
            result = child_import()
        else:
            result = child_load(rest[0])
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    args.out.write_text(json.dumps(measure(args.bundle, args.pairs, args.repeats), indent=2) + "\n")


if __name__ == "__main__":
    main()
