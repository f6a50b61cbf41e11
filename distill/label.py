"""Resumable labeling: grade many pairs with a teacher, chunk by chunk, losing nothing to a crash.

    label_pairs(teacher, pairs, "teacher.jsonl.gz", chunk_size=1000, provenance={"name": ...})

Labeling a large pair set with an LLM takes hours; a killed process, a full disk or a teacher that
falls over must cost at most the chunk in flight. Each chunk's outputs are appended to a JSONL part
file beside the output (``<out>.part.jsonl``, the teacher-file record format) and fsynced; only then
is the progress file (``<out>.progress.json``, replaced atomically) advanced. On a rerun with the
same teacher, pairs and chunk size, the part file is cut back to the last committed chunk (dropping a
chunk whose write a crash interrupted) and labeling continues from there. When every chunk is in,
the final file is written with :func:`darl_lite.teacher_file.write_teacher_outputs` (temp file +
rename: a half-written final file never exists, and an earlier one stays intact until the new one is
complete), and the work files are removed.

Nothing here needs torch: a teacher is anything with ``name``, ``kind`` and ``predict_proba``
(:meth:`TeacherSpec.build` imports the model code only when called).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from darl_lite.atomic import atomic_write_json
from darl_lite.errors import DataError, InputError
from darl_lite.teacher import Teacher
from darl_lite.teacher_file import _record, read_teacher_outputs, write_teacher_outputs
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

_PROGRESS_FORMAT = 1
PART_SUFFIX = ".part.jsonl"
PROGRESS_SUFFIX = ".progress.json"


@dataclass(frozen=True)
class TeacherSpec:
    """How to build the labeling teacher, as plain data: every labeling path builds it the same way.

    ``darl-lite distill label`` builds it in process; the Ray path ships it to each actor (it pickles),
    so the teacher an actor grades with is the one the single-process path would have built.
    ``head``: a probe head from ``distill teacher`` (the tuned LLM teacher, :class:`ProbeTeacher`);
    without it, ``model`` is an HF folder with a classification head (:class:`HFTeacher`).
    """

    model: str
    head: str | None = None
    name: str | None = None
    kind: str = "llm"
    max_length: int = 128
    batch_size: int = 32

    def build(self) -> Teacher:
        """Load the model (and head) and return the teacher; needs the ``distill`` extra."""
        if self.head:
            from darl_lite.distill.teacher_tune import ProbeTeacher

            probe = ProbeTeacher.from_files(self.model, self.head, batch_size=self.batch_size)
            if self.name:
                probe.name = self.name
            return probe
        from darl_lite.distill.teachers import HFTeacher

        kind: Any = self.kind
        return HFTeacher.from_pretrained(
            self.model, name=self.name, kind=kind, max_length=self.max_length, batch_size=self.batch_size
        )

    def teacher_name(self) -> str:
        """The name the built teacher will carry, known without loading the model."""
        if self.name:
            return self.name
        if self.head:
            from darl_lite.distill.teacher_tune import TEACHER_NAME

            return TEACHER_NAME
        return Path(self.model).resolve().name

    def teacher_kind(self) -> str:
        """The kind the built teacher will carry (a probe teacher is always an LLM)."""
        return "llm" if self.head else self.kind


@dataclass(frozen=True, slots=True)
class LabelResult:
    """What a call did: the file written, the distinct pairs in it, and the chunks it had to label."""

    path: Path
    n_pairs: int
    n_chunks: int
    chunks_labeled: int  # in this call; ``n_chunks - chunks_labeled`` came from an earlier run
    resumed: bool


def part_path(out_path: str | os.PathLike[str]) -> Path:
    """The part file of an output: committed chunks so far, one teacher-file record per line."""
    out = Path(out_path)
    return out.with_name(out.name + PART_SUFFIX)


def progress_path(out_path: str | os.PathLike[str]) -> Path:
    """The progress file of an output: how many chunks (and bytes of the part file) are committed."""
    out = Path(out_path)
    return out.with_name(out.name + PROGRESS_SUFFIX)


def _distinct(pairs: Sequence[Pair]) -> list[Pair]:
    """Pairs with distinct keys, first occurrence first (the output holds one record per key)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for pair in pairs:
        if pair.key not in seen:
            seen.add(pair.key)
            out.append(pair)
    return out


def _fingerprint(teacher: Teacher, pairs: Sequence[Pair], chunk_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([teacher.name, teacher.kind, chunk_size, len(pairs)]).encode())
    for pair in pairs:
        digest.update(json.dumps(pair.key).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _write_progress(path: Path, progress: Mapping[str, Any]) -> None:
    atomic_write_json(path, progress, indent=2, sort_keys=True)


def _read_progress(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable labeling progress ({exc}); delete it to start over") from exc
    if not isinstance(progress, dict) or progress.get("format") != _PROGRESS_FORMAT:
        raise DataError(f"{path}: not a labeling progress file of format {_PROGRESS_FORMAT}")
    if progress.get("fingerprint") != fingerprint:
        raise InputError(
            f"{path} records an interrupted labeling run of a different teacher, pair list or "
            f"chunk size; rerun with the same ones to resume, or delete {path} and "
            f"{path.name.removesuffix(PROGRESS_SUFFIX) + PART_SUFFIX} to start over"
        )
    return progress


def _chunk_lines(
    teacher: Teacher, chunk: Sequence[Pair], first: int, n_grades: int | None
) -> tuple[bytes, int]:
    """Ask the teacher for one chunk and render its records; every check happens before any write."""
    probs = np.asarray(teacher.predict_proba(list(chunk)), dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(chunk) or probs.shape[1] < 2:
        raise DataError(
            f"teacher {teacher.name!r} returned shape {probs.shape} for pairs "
            f"{first}..{first + len(chunk) - 1}; expected ({len(chunk)}, n_grades)"
        )
    if n_grades is not None and probs.shape[1] != n_grades:
        raise DataError(
            f"teacher {teacher.name!r} returned {probs.shape[1]} grades for pairs from {first}; "
            f"earlier chunks had {n_grades}"
        )
    lines = []
    for offset, (pair, row) in enumerate(zip(chunk, probs.astype(np.float32), strict=True)):
        where = f"teacher {teacher.name!r} output for pair {first + offset}"
        # The shortest text that round-trips the float32, exactly as write_teacher_outputs writes it.
        values = [float(str(x)) for x in row]
        _record({"query": pair.query, "item": pair.item, "probs": values}, where, probs.shape[1])
        line = json.dumps({"query": pair.query, "item": pair.item, "probs": values}, ensure_ascii=False)
        try:
            lines.append(line.encode("utf-8") + b"\n")
        except UnicodeEncodeError as exc:
            raise InputError(f"pair {first + offset}: text is not valid Unicode ({exc.reason})") from exc
    return b"".join(lines), int(probs.shape[1])


def _append(part: Path, data: bytes) -> int:
    """Append ``data`` durably; return the part file's new size."""
    with open(part, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def label_pairs(
    teacher: Teacher,
    pairs: Sequence[Pair],
    out_path: str | os.PathLike[str],
    *,
    chunk_size: int = 1000,
    provenance: Mapping[str, Any] | None,
) -> LabelResult:
    """Grade every distinct pair with ``teacher`` and write ``out_path`` (teacher-file format).

    Resumes an interrupted run of the same teacher (``name`` and ``kind``), pairs and ``chunk_size``
    from its last committed chunk; refuses, with :class:`InputError`, work files of a different run.
    A teacher that raises or returns malformed output stops the run with that error (committed
    chunks are kept). A write failure (e.g. a full disk, ``ENOSPC``) raises :class:`OSError` with the
    same errno, saying how many pairs are safe; the final file is either complete or untouched.
    ``provenance`` goes to the sidecar as in :func:`write_teacher_outputs` (``None``: no sidecar).
    """
    todo = _checked_inputs(teacher, pairs, chunk_size, provenance)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    part, progress_file = part_path(out), progress_path(out)
    n_chunks = math.ceil(len(todo) / chunk_size)
    progress, resumed = _start_or_resume(
        part, progress_file, _fingerprint(teacher, todo, chunk_size), len(todo), chunk_size, n_chunks
    )
    labeled = 0
    for index in range(int(progress["chunks_done"]), n_chunks):
        progress = _label_chunk(teacher, todo, index, chunk_size, n_chunks, part, progress_file, progress)
        labeled += 1
    _write_final(out, part, progress_file, todo, provenance)
    return LabelResult(
        path=out, n_pairs=len(todo), n_chunks=n_chunks, chunks_labeled=labeled, resumed=resumed
    )


def _checked_inputs(
    teacher: Teacher, pairs: Sequence[Pair], chunk_size: int, provenance: Mapping[str, Any] | None
) -> list[Pair]:
    """The distinct pairs to label, after every argument is checked (now, not after hours of labeling)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")
    for field in ("name", "kind"):
        if not isinstance(getattr(teacher, field, None), str):
            raise InputError(f"teacher.{field} must be a string (it identifies the run for resuming)")
    if provenance is not None:
        if not isinstance(provenance, Mapping):
            raise InputError(f"provenance must be a dict or None, got {type(provenance).__name__}")
        try:
            json.dumps(dict(provenance))
        except (TypeError, ValueError) as exc:
            raise InputError(f"provenance must be JSON-serialisable: {exc}") from exc
    todo = _distinct(pairs)
    if not todo:
        raise InputError("label_pairs got no pairs; pass at least one pair to label")
    for i, pair in enumerate(todo):
        if not isinstance(pair, Pair):
            raise InputError(f"pairs[{i}] must be a Pair, got {type(pair).__name__}")
    return todo


def _start_or_resume(
    part: Path, progress_file: Path, fingerprint: str, n_pairs: int, chunk_size: int, n_chunks: int
) -> tuple[dict[str, Any], bool]:
    """The run's progress record: a fresh one, or the committed state of an interrupted run of the
    same fingerprint (an uncommitted tail of the part file is dropped)."""
    progress = _read_progress(progress_file, fingerprint)
    if progress is None:
        progress = {
            "format": _PROGRESS_FORMAT,
            "fingerprint": fingerprint,
            "n_pairs": n_pairs,
            "chunk_size": chunk_size,
            "chunks_done": 0,
            "part_bytes": 0,
            "n_grades": None,
        }
        part.write_bytes(b"")  # a part file without progress holds nothing committed
        _write_progress(progress_file, progress)
        return progress, False
    committed = int(progress["part_bytes"])
    size = part.stat().st_size if part.is_file() else -1
    if size < committed:
        raise DataError(
            f"{part} is {max(size, 0)} bytes but {progress_file} records {committed} committed; "
            f"the part file was damaged or removed: delete {progress_file} to start over"
        )
    if size > committed:  # a chunk whose append a crash interrupted: not committed, drop it
        logger.info("dropping %d uncommitted bytes at the end of %s", size - committed, part)
        os.truncate(part, committed)
    logger.info("resuming labeling at chunk %d of %d", progress["chunks_done"], n_chunks)
    return progress, True


def _label_chunk(
    teacher: Teacher,
    todo: list[Pair],
    index: int,
    chunk_size: int,
    n_chunks: int,
    part: Path,
    progress_file: Path,
    progress: dict[str, Any],
) -> dict[str, Any]:
    """Grade chunk ``index``, append it to the part file and commit it in the progress record."""
    first = index * chunk_size
    data, n_grades = _chunk_lines(teacher, todo[first : first + chunk_size], first, progress["n_grades"])
    try:
        size = _append(part, data)
        progress = {**progress, "chunks_done": index + 1, "part_bytes": size, "n_grades": n_grades}
        _write_progress(progress_file, progress)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"labeling could not write chunk {index + 1} of {n_chunks} to {part} "
            f"({exc.strerror or exc}); {first} of {len(todo)} pairs are saved there and a rerun "
            "resumes from them",
        ) from exc
    logger.info("labeled chunk %d of %d", index + 1, n_chunks)
    return progress


def _write_final(
    out: Path, part: Path, progress_file: Path, todo: list[Pair], provenance: Mapping[str, Any] | None
) -> None:
    """Check the part file holds every pair, write the teacher file, then drop the work files."""
    outputs = read_teacher_outputs(part)
    missing = [pair for pair in todo if pair.key not in outputs]
    if missing or len(outputs) != len(todo):
        raise DataError(
            f"{part} holds {len(outputs)} records for {len(todo)} pairs ({len(missing)} missing); "
            f"it was changed outside this run: delete it and {progress_file} to start over"
        )
    probs: NDArray[np.float32] = np.stack([outputs[pair.key] for pair in todo])
    try:
        write_teacher_outputs(out, todo, probs, provenance)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"labeling could not write {out} ({exc.strerror or exc}); the previous {out.name} (if any) is "
            f"intact and all {len(todo)} labels are safe in {part}: a rerun writes the file without "
            "labeling again",
        ) from exc
    part.unlink(missing_ok=True)
    progress_file.unlink(missing_ok=True)


__all__ = ["LabelResult", "TeacherSpec", "label_pairs", "part_path", "progress_path"]
