"""Label pairs at cluster scale: the tuned teacher on a Ray actor pool, written as resumable Parquet shards.

    label_pairs_ray(TeacherSpec(model_dir, head="head.npz"), pairs, "graded/", shard_size=10_000,
                    options=RayOptions(actors=8, cpus_per_actor=4), provenance={...})

The driver (this process) plans the work: the distinct pairs, in input order, cut into shards of
``shard_size`` pairs; shard ``i`` is ``shard-00000i.parquet`` (columns ``query``, ``item``,
``probs``: the teacher-file format, so every shard is itself a readable teacher file). Rows of the
shards not yet on disk go to a Ray Data ``map_batches`` over a fixed pool of actors; each actor
builds the teacher once from the :class:`TeacherSpec` (the very object the single-process
``label_pairs`` path builds) and grades batches of rows. The driver gathers each shard's rows and,
once a shard is complete, writes it to a temporary file and renames it into place: a shard on disk
is always whole. A rerun with the same teacher, pairs and shard size skips the shards on disk;
``plan.json`` refuses a run of another teacher or pair list. ``provenance.json`` is written last.

Only the driver touches the output folder (actors return grades, not files), so on a cluster it
need only be on the machine that runs the command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from darl_lite.distill.label import TeacherSpec
from darl_lite.distill.ray_engine import (
    RayOptions,
    import_ray,
    ray_session,
    run_actor_pool,
    set_actor_threads,
)
from darl_lite.errors import DataError, InputError
from darl_lite.teacher_file import (
    PROB_SUM_TOL,
    _import_pyarrow,
    read_teacher_outputs,
    write_teacher_outputs,
)
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
PROVENANCE_NAME = "provenance.json"
_PLAN_FORMAT = 1
Key = tuple[str, str]


@dataclass(frozen=True)
class RayLabelResult:
    """What a call did: the shard folder, the distinct pairs, and how many shards this call graded."""

    out_dir: Path
    n_pairs: int
    n_shards: int
    shards_labeled: int  # in this call; ``n_shards - shards_labeled`` were on disk already
    resumed: bool


def shard_path(out_dir: str | os.PathLike[str], index: int) -> Path:
    """Where shard ``index`` lives: ``shard-00000.parquet``, ``shard-00001.parquet``, ..."""
    return Path(out_dir) / f"shard-{index:05d}.parquet"


class GradeActor:
    """One Ray actor: builds the teacher once, then grades numpy batches ``{shard, row, query, item}``."""

    def __init__(self, spec: TeacherSpec, threads: int) -> None:
        set_actor_threads(threads)
        self.teacher = spec.build()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [Pair(query=str(q), item=str(i)) for q, i in zip(batch["query"], batch["item"], strict=True)]
        probs = np.asarray(self.teacher.predict_proba(pairs), dtype=np.float32)
        return {"shard": np.asarray(batch["shard"]), "row": np.asarray(batch["row"]), "probs": probs}


# --------------------------------------------------------------------------------------------------
# The plan: which pairs, which shards, which run


def distinct_checked(pairs: Sequence[Pair]) -> list[Pair]:
    """Distinct pairs, first occurrence first, each checked to be a Pair of valid Unicode text."""
    seen: set[Key] = set()
    out: list[Pair] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Pair):
            raise InputError(f"pairs[{i}] must be a Pair, got {type(pair).__name__}")
        for field in ("query", "item"):
            text = getattr(pair, field)
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"pairs[{i}].{field} must be non-empty text; got {text!r}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(f"pairs[{i}].{field}: text is not valid Unicode ({exc.reason})") from exc
        if pair.key not in seen:
            seen.add(pair.key)
            out.append(pair)
    if not out:
        raise InputError("no pairs to label; pass a pairs file with at least one (query, item) row")
    return out


def _file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_identity(spec: TeacherSpec, model_sha256: str) -> dict[str, Any]:
    """What makes two runs the same teacher: name, kind, weights and head hashes, template inputs."""
    identity: dict[str, Any] = {
        "name": spec.teacher_name(),
        "kind": spec.teacher_kind(),
        "model_sha256": model_sha256,
    }
    if spec.head:
        identity["head_sha256"] = _file_sha256(spec.head)
    else:
        identity["max_length"] = spec.max_length
    return identity


def _fingerprint(identity: Mapping[str, Any], pairs: Sequence[Pair], shard_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([dict(identity), shard_size, len(pairs)], sort_keys=True).encode())
    for pair in pairs:
        digest.update(json.dumps(pair.key).encode("utf-8"))
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _open_plan(out: Path, fingerprint: str, n_pairs: int, shard_size: int) -> bool:
    """Write the plan of a new run, or check that the folder's plan is this run's; True if resuming."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; with --ray it must be a folder (shards go inside)")
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / PLAN_NAME
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{plan_file}: unreadable labeling plan ({exc}); delete the folder to start over"
            ) from exc
        if not isinstance(plan, dict) or plan.get("format") != _PLAN_FORMAT:
            raise DataError(f"{plan_file}: not a labeling plan of format {_PLAN_FORMAT}")
        if plan.get("fingerprint") != fingerprint:
            raise InputError(
                f"{out} holds shards of a different teacher, pair list or shard size; rerun with the "
                "same ones to resume, or pass another --out folder (or delete this one) to start over"
            )
        return True
    if any(out.glob("shard-*.parquet")):
        raise InputError(f"{out} holds shards but no {PLAN_NAME}; pass an empty or new --out folder")
    n_shards = math.ceil(n_pairs / shard_size)
    plan = {"format": _PLAN_FORMAT, "fingerprint": fingerprint, "n_pairs": n_pairs,
            "shard_size": shard_size, "n_shards": n_shards}  # fmt: skip
    _write_json_atomic(plan_file, plan)
    return False


def _shard_on_disk(path: Path, expected: Sequence[Pair]) -> bool:
    """Whether shard ``path`` exists and holds exactly ``expected``'s pairs, in order."""
    if not path.is_file():
        return False
    pa = _import_pyarrow()
    try:
        table = pa.parquet.read_table(path, columns=["query", "item", "probs"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc}); delete it and rerun to grade it again") from exc
    keys = list(zip(table.column("query").to_pylist(), table.column("item").to_pylist(), strict=True))
    if keys != [pair.key for pair in expected]:
        raise DataError(
            f"{path} holds {len(keys)} pairs that are not this shard's {len(expected)}; it was changed "
            "outside this run: delete it and rerun to grade it again"
        )
    return True


# --------------------------------------------------------------------------------------------------
# Grading on the pool, writing shards


def _check_grades(probs: NDArray[np.float32], shard: int, n_grades: int | None) -> int:
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise DataError(f"the teacher returned shape {probs.shape} for shard {shard}; expected (n, n_grades)")
    if n_grades is not None and probs.shape[1] != n_grades:
        raise DataError(
            f"the teacher returned {probs.shape[1]} grades for shard {shard}; others had {n_grades}"
        )
    sums = probs.astype(np.float64).sum(axis=1)
    if (
        not np.all(np.isfinite(probs))
        or probs.min() < 0
        or probs.max() > 1
        or np.any(abs(sums - 1) > PROB_SUM_TOL)
    ):
        raise DataError(f"the teacher returned rows that are not probability distributions in shard {shard}")
    return int(probs.shape[1])


def _write_shard(path: Path, pairs: Sequence[Pair], probs: NDArray[np.float32]) -> None:
    """One shard, whole or not at all: a temporary file beside it, fsynced, renamed into place."""
    pa = _import_pyarrow()
    table = pa.table(
        {
            "query": pa.array([p.query for p in pairs], type=pa.string()),
            "item": pa.array([p.item for p in pairs], type=pa.string()),
            "probs": pa.array(list(probs.astype(np.float32)), type=pa.list_(pa.float32())),
        }
    )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pa.parquet.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rows(shards: Mapping[int, Sequence[Pair]]) -> Iterator[dict[str, Any]]:
    """The rows to grade, each with its ``shard`` and ``row`` (in the shard) to put it back."""
    for index, pairs in shards.items():
        for row, pair in enumerate(pairs):
            yield {"shard": index, "row": row, "query": pair.query, "item": pair.item}


def _grade_and_write(
    spec: TeacherSpec, todo: Mapping[int, Sequence[Pair]], out: Path, options: RayOptions
) -> int:
    """Grade the ``todo`` shards on the actor pool; write each as soon as its last row is in."""
    pending: dict[int, NDArray[np.float32]] = {}
    filled: dict[int, int] = {}
    n_grades: int | None = None
    written = 0
    bar = tqdm(total=sum(len(rows) for rows in todo.values()), desc="teacher on Ray", unit="pair")
    try:
        for batch in run_actor_pool(_rows(todo), GradeActor, (spec, options.threads), options):
            shards, rows = np.asarray(batch["shard"]), np.asarray(batch["row"])
            probs = np.asarray(batch["probs"], dtype=np.float32)
            for shard in np.unique(shards).tolist():
                mask = shards == shard
                n_grades = _check_grades(probs[mask], shard, n_grades)
                if shard not in pending:
                    pending[shard] = np.full((len(todo[shard]), n_grades), np.nan, np.float32)
                    filled[shard] = 0
                pending[shard][rows[mask]] = probs[mask]
                filled[shard] += int(mask.sum())
                if filled[shard] == len(todo[shard]):
                    _write_shard(shard_path(out, shard), todo[shard], pending.pop(shard))
                    written += 1
                    logger.info("wrote shard %d (%d pairs)", shard, len(todo[shard]))
            bar.update(len(rows))
    except Exception:
        logger.error(
            "labeling stopped; %d shards written in this run are kept in %s, a rerun resumes", written, out
        )
        raise
    finally:
        bar.close()
    return written


def _check_head(spec: TeacherSpec) -> None:
    """The head file and its fit to the model, checked here so a wrong head fails before any actor starts."""
    if not spec.head:
        return
    if not Path(spec.head).is_file():
        raise InputError(f"--head {spec.head}: no such file; pass the .npz head from `distill teacher`")
    from darl_lite.distill.llm_teacher import ProbeHead

    head = ProbeHead.load(spec.head)
    config = json.loads((Path(spec.model) / "config.json").read_text(encoding="utf-8"))
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if isinstance(layers, int) and not -(layers + 1) <= head.layer < layers + 1:
        raise InputError(
            f"the head reads layer {head.layer}; this model has {layers + 1} hidden states. Load the "
            "LLM the head was trained on (its sha256 is in the teacher file's provenance)"
        )
    if isinstance(hidden, int) and head.weight.shape[1] != hidden:
        raise InputError(
            f"the head reads {head.weight.shape[1]} features; this model's hidden size is {hidden}. "
            "Load the LLM the head was trained on"
        )


def label_pairs_ray(
    spec: TeacherSpec,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 10_000,
    options: RayOptions | None = None,
    provenance: Mapping[str, Any] | None = None,
    model_sha256: str | None = None,
) -> RayLabelResult:
    """Grade every distinct pair with ``spec``'s teacher on a Ray actor pool into Parquet shards.

    Grades equal the single-process :func:`darl_lite.distill.label.label_pairs` (same teacher, same
    float32 values up to the batch composition's rounding, ~1e-6). Shards already on disk from an
    interrupted run of the same teacher, pairs and ``shard_size`` are kept; a folder of another run
    is refused with :class:`InputError`. ``provenance`` (plus the run's identity and Ray settings)
    goes to ``provenance.json`` when every shard is in. ``model_sha256`` saves hashing the weights
    again when the caller already did.
    """
    from darl_lite.distill.backbone import local_model_dir, weights_sha256

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be an integer >= 1; got {shard_size!r}")
    options = options or RayOptions()
    import_ray()  # a missing extra fails before any work
    local_model_dir(spec.model, "--model")
    _check_head(spec)
    todo_pairs = distinct_checked(pairs)
    identity = run_identity(spec, model_sha256 or weights_sha256(spec.model))
    out = Path(out_dir)
    resumed = _open_plan(out, _fingerprint(identity, todo_pairs, shard_size), len(todo_pairs), shard_size)
    for stale in out.glob(".shard-*.tmp"):  # a write a crash interrupted
        stale.unlink()
    shards = {
        i: todo_pairs[i * shard_size : (i + 1) * shard_size]
        for i in range(math.ceil(len(todo_pairs) / shard_size))
    }
    todo = {i: rows for i, rows in shards.items() if not _shard_on_disk(shard_path(out, i), rows)}
    logger.info("%d of %d shards to grade in %s", len(todo), len(shards), out)
    written = 0
    if todo:
        with ray_session(options.address):
            written = _grade_and_write(spec, todo, out, options)
    meta = {**dict(provenance or {}), **identity, "n_records": len(todo_pairs), "shards": len(shards),
            "shard_size": shard_size, "ray": {"actors": options.actors, "batch_size": options.batch_size,
                                              "cpus_per_actor": options.cpus_per_actor}}  # fmt: skip
    _write_json_atomic(out / PROVENANCE_NAME, meta)
    return RayLabelResult(out, len(todo_pairs), len(shards), written, resumed)


# --------------------------------------------------------------------------------------------------
# Reading the shards back


def read_shards(out_dir: str | os.PathLike[str]) -> dict[Key, NDArray[np.float32]]:
    """Every shard's outputs as ``{(query, item): probs}``, each record checked (teacher-file rules)."""
    out = Path(out_dir)
    plan_file = out / PLAN_NAME
    if not plan_file.is_file():
        raise DataError(f"{out}: no {PLAN_NAME}; not a folder written by `distill label --ray`")
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    outputs: dict[Key, NDArray[np.float32]] = {}
    n_grades: set[int] = set()
    for index in range(int(plan["n_shards"])):
        path = shard_path(out, index)
        if not path.is_file():
            raise DataError(f"{path} is missing: the run is unfinished; rerun the same command to finish it")
        shard = read_teacher_outputs(path)
        n_grades.update(len(v) for v in shard.values())
        outputs.update(shard)
    if len(n_grades) > 1 or len(outputs) != int(plan["n_pairs"]):
        raise DataError(
            f"{out}: shards hold {len(outputs)} pairs with {sorted(n_grades)} grades; "
            f"its plan says {plan['n_pairs']} pairs: rerun the same command to finish it"
        )
    return outputs


def merge_shards(out_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """One teacher file (``.jsonl.gz`` or ``.parquet``) from the shards; ``provenance.json`` its sidecar."""
    out = Path(out_dir)
    outputs = read_shards(out)
    meta_file = out / PROVENANCE_NAME
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else None
    pairs = [Pair(query=q, item=i) for q, i in outputs]
    probs = np.stack(list(outputs.values())) if outputs else np.zeros((0, 3), np.float32)
    return write_teacher_outputs(path, pairs, probs, meta)


__all__ = [
    "GradeActor",
    "RayLabelResult",
    "label_pairs_ray",
    "merge_shards",
    "read_shards",
    "shard_path",
]
