"""``darl-lite distill label ... --ray [ADDRESS]``: the labeling command's options for a Ray actor pool.

Parser options and the handler of the Ray path; the single-process path stays in
:mod:`darl_lite.cli`. Nothing here imports ray or torch until the handler runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from darl_lite.errors import InputError
from darl_lite.types import Pair

#: Options that only mean something with --ray, and their defaults.
_RAY_ONLY = {"actors": 1, "ray_batch_size": 256, "cpus_per_actor": 1.0, "merge": None}


def add_ray_label_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray [ADDRESS]``, ``--actors``, ``--ray-batch-size``, ``--cpus-per-actor``, ``--merge``."""
    group = parser.add_argument_group(
        "Ray (grade on an actor pool; --out is then a folder of Parquet shards, one per --chunk-size pairs)"
    )
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="grade with Ray Data: no ADDRESS = RAY_ADDRESS or a local instance; 'auto', HOST:6379, "
        "ray://HOST:10001 connect to a running cluster",
    )
    group.add_argument("--actors", type=int, default=None, help="actors in the pool, one model each (1)")
    group.add_argument("--ray-batch-size", type=int, default=None, help="pairs per actor call (256)")
    group.add_argument(
        "--cpus-per-actor", type=float, default=None, help="CPUs reserved per actor = its threads (1)"
    )
    group.add_argument(
        "--merge", default=None, metavar="FILE", help="also write one teacher file (.jsonl.gz/.parquet)"
    )


def ray_requested(args: argparse.Namespace) -> bool:
    """Whether to take the Ray path; Ray-only options without ``--ray`` are an error, not ignored."""
    given = [name for name in _RAY_ONLY if getattr(args, name, None) is not None]
    if args.ray is None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InputError(f"{flags} only apply with --ray; add --ray [ADDRESS] or drop them")
    return args.ray is not None


def _option(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return _RAY_ONLY[name] if value is None else value


def run_ray_label(
    args: argparse.Namespace, spec: Any, pairs: Sequence[Pair], provenance: Mapping[str, Any]
) -> int:
    """Grade ``pairs`` with ``spec`` (a :class:`~darl_lite.distill.label.TeacherSpec`) on Ray."""
    from darl_lite.distill.ray_engine import RayOptions
    from darl_lite.distill.ray_label import label_pairs_ray, merge_shards

    options = RayOptions(
        address=args.ray or None,
        actors=_option(args, "actors"),
        batch_size=_option(args, "ray_batch_size"),
        cpus_per_actor=_option(args, "cpus_per_actor"),
    )
    result = label_pairs_ray(
        spec,
        pairs,
        args.out,
        shard_size=args.chunk_size,
        options=options,
        provenance=provenance,
        model_sha256=str(provenance.get("model_sha256")) if provenance.get("model_sha256") else None,
    )
    resumed = ", resumed" if result.resumed else ""
    print(
        f"labelled {result.n_pairs:,} pairs into {result.out_dir} ({result.shards_labeled} of "
        f"{result.n_shards} shards in this run on {options.actors} Ray actor(s){resumed})"
    )
    if args.merge:
        print(f"merged the shards into {merge_shards(result.out_dir, args.merge)}")
    return 0


__all__ = ["add_ray_label_options", "ray_requested", "run_ray_label"]
