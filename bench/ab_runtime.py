"""A/B the runtime's scoring path against an earlier revision, on the same machine, bundle and pairs.

    python -m bench.ab_runtime --rev bafcf7a --bundle darl-lite-run/bundle [--rounds 4] [--blocks 3]

The earlier revision's ``darl_lite`` package is extracted with ``git archive`` into a temporary
folder and imported from there in its own process (the editable install's finder is removed from
``sys.meta_path`` in that process only). Old and new processes alternate ``--rounds`` times; each
times ``--blocks`` blocks of ``--calls`` calls of one 100-item query (real id_test items) after a
warm-up, and reports the median of each block. Both must load the bundle: an older runtime ignores
files a newer export added (it verifies their hashes all the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, statistics, sys, time
old, bundle, blocks, calls, threads, items_n = sys.argv[1:7]
if old:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, old)
import darl_lite
from darl_lite.datasets import load_dbpedia
from darl_lite.inference import SessionConfig
from darl_lite.scorer import Scorer
assert bool(old) == darl_lite.__file__.startswith(old or "\0"), darl_lite.__file__
pairs = list(load_dbpedia(0).id_test)
query, items = pairs[0].query, [p.item for p in pairs][: int(items_n)]
scorer = Scorer.load(bundle, session=SessionConfig(intra_op_threads=int(threads)))
for _ in range(5):
    scorer.score(query, items)
medians = []
for _ in range(int(blocks)):
    times = []
    for _ in range(int(calls)):
        t = time.perf_counter()
        scorer.score(query, items)
        times.append(time.perf_counter() - t)
    medians.append(statistics.median(times) * 1000)
print(json.dumps(medians))
"""


def extract(rev: str, target: Path) -> Path:
    """The ``darl_lite`` package of ``rev`` under ``target`` (returns the folder to put on sys.path)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "darl_lite"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def run(
    rev: str, bundle: str, rounds: int, blocks: int, calls: int, threads: int, items: int
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="darl-ab-") as tmp:
        old = str(extract(rev, Path(tmp)))
        results: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for name, path in (("old", old), ("new", "")):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        _CHILD,
                        path,
                        bundle,
                        str(blocks),
                        str(calls),
                        str(threads),
                        str(items),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[name].extend(json.loads(out.stdout.strip().splitlines()[-1]))
    old_ms, new_ms = statistics.median(results["old"]), statistics.median(results["new"])
    return {
        "rev": rev,
        "items": items,
        "threads": threads,
        "old_ms": round(old_ms, 2),
        "new_ms": round(new_ms, 2),
        "new_over_old": round(new_ms / old_ms, 3),
        "block_medians_ms": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (a commit or tag)")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--items", type=int, default=100)
    args = parser.parse_args()
    print(
        json.dumps(
            run(args.rev, args.bundle, args.rounds, args.blocks, args.calls, args.threads, args.items),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
