"""Teacher outputs computed elsewhere (e.g. an LLM on a GPU cluster), stored as a file and served back.

Format: one record per pair, ``{"query": str, "item": str, "probs": [n_grades floats]}``, as JSONL
(``.jsonl`` / ``.jsonl.gz``) or Parquet (``.parquet``; ``probs`` a ``list<float>`` column). The data
file has no header so it can be concatenated and streamed; who produced it and how goes in an
optional sidecar ``<file>.provenance.json`` (``name``, ``kind``, ``model_sha256``, ``recipe``,
``command``, ``date``, ...), which the student bundle later records as its teacher identity.
Pairs are matched by :attr:`Pair.key` = ``(query, item)``, exactly as written.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from darl_lite.atomic import atomic_path, atomic_write_text, fsync_file
from darl_lite.errors import DataError, InputError, MissingExtraError
from darl_lite.lines import jsonl_objects
from darl_lite.types import GRADE_NAMES, Pair

logger = logging.getLogger(__name__)

#: Rows of ``probs`` must sum to 1 within this tolerance.
PROB_SUM_TOL = 1e-3
#: File endings this module reads and writes, and the format each means.
SUPPORTED_SUFFIXES: dict[str, str] = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
PROVENANCE_SUFFIX = ".provenance.json"
#: How many missing pairs an error message shows.
_SHOW_MISSING = 3

Key = tuple[str, str]


def provenance_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar of an outputs file: ``<file>.provenance.json`` beside it."""
    source = Path(path)
    return source.with_name(source.name + PROVENANCE_SUFFIX)


def _file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUPPORTED_SUFFIXES[suffix]
    raise DataError(
        f"{path}: unsupported teacher-output file type; supported endings are {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # loads the submodule onto the package
    except ImportError as exc:
        raise MissingExtraError.for_module("pyarrow", "distill") from exc
    return pyarrow


# --------------------------------------------------------------------------------------------------
# Validation shared by both formats


def _check_probs(value: Any, where: str, n_grades: int | None) -> NDArray[np.float32]:
    """A probability vector: a list of ``n_grades`` numbers, each in [0, 1], summing to 1."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}, field 'probs': expected a list of floats, got {type(value).__name__}")
    if n_grades is not None and len(value) != n_grades:
        raise DataError(
            f"{where}, field 'probs': expected {n_grades} probabilities (one per grade, as in the "
            f"first record), got {len(value)}"
        )
    if not value:
        raise DataError(f"{where}, field 'probs': empty list; expected one probability per grade")
    for j, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise DataError(f"{where}, field 'probs'[{j}]: expected a number, got {x!r}")
        if math.isnan(x) or math.isinf(x):
            raise DataError(f"{where}, field 'probs'[{j}]: must be finite, got {x!r}")
        if not 0.0 <= x <= 1.0:
            raise DataError(f"{where}, field 'probs'[{j}]: must be in [0, 1], got {x!r}")
    total = math.fsum(float(x) for x in value)
    if abs(total - 1.0) > PROB_SUM_TOL:
        raise DataError(
            f"{where}, field 'probs': must sum to 1 (±{PROB_SUM_TOL}), got {total:.6g}; "
            "store softmax probabilities, not logits"
        )
    return np.asarray(value, dtype=np.float32)


def _check_text(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}, field {field!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}, field {field!r}: empty or whitespace; expected text")
    return value


def _record(record: Mapping[str, Any], where: str, n_grades: int | None) -> tuple[Key, NDArray[np.float32]]:
    """The one check every format shares: a record to its key and probability vector."""
    for field in ("query", "item", "probs"):
        if field not in record or record[field] is None:
            raise DataError(
                f"{where}: missing field {field!r}; fields found: {', '.join(map(repr, record)) or 'none'}"
            )
    key = (_check_text(record, "query", where), _check_text(record, "item", where))
    return key, _check_probs(record["probs"], where, n_grades)


class _Collector:
    """Accumulates records, keeping the first place each key was seen to report duplicates."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outputs: dict[Key, NDArray[np.float32]] = {}
        self.first_seen: dict[Key, str] = {}
        self.n_grades: int | None = None

    def add(self, record: Mapping[str, Any], where: str) -> None:
        key, probs = _record(record, where, self.n_grades)
        self.n_grades = len(probs)
        previous = self.outputs.get(key)
        if previous is None:
            self.outputs[key] = probs
            self.first_seen[key] = where
        elif not np.array_equal(previous, probs):
            raise DataError(
                f"{where}: duplicate pair (query={key[0]!r}, item={key[1]!r}) with probs "
                f"{probs.tolist()} differing from {previous.tolist()} at "
                f"{self.first_seen[key].removeprefix(f'{self.path}, ')}"
            )


# --------------------------------------------------------------------------------------------------
# Reading


def _read_jsonl(path: Path, collector: _Collector) -> None:
    for where, record in jsonl_objects(path):
        collector.add(record, where)


def _read_parquet(path: Path, collector: _Collector) -> None:
    pa = _import_pyarrow()
    try:
        table = pa.parquet.read_table(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid subclasses ValueError
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = [name for name in ("query", "item", "probs") if name not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"columns found: {', '.join(map(repr, table.column_names)) or 'none'}"
        )
    columns = {name: table.column(name).to_pylist() for name in ("query", "item", "probs")}
    for i in range(table.num_rows):
        collector.add({name: values[i] for name, values in columns.items()}, f"{path}, row {i}")


def read_teacher_outputs(path: str | os.PathLike[str]) -> dict[Key, NDArray[np.float32]]:
    """Load outputs as ``{(query, item): probs}`` (float32, one length for all), checking every record.

    Malformed records raise :class:`DataError` naming the line (JSONL, 1-based) or row (Parquet,
    0-based) and the field. A pair repeated with identical probs is accepted once; with different
    probs it is an error, since the file then cannot say what the teacher thought.
    """
    source = Path(path)
    fmt = _file_format(source)
    if not source.is_file():
        raise DataError(f"{source}: no such teacher-output file")
    collector = _Collector(source)
    if fmt == "jsonl":
        _read_jsonl(source, collector)
    else:
        _read_parquet(source, collector)
    logger.debug("read %d teacher outputs from %s", len(collector.outputs), source)
    return collector.outputs


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of an outputs file as a dict, or None when there is none."""
    sidecar = provenance_path(path)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{sidecar}: unreadable provenance (expected a JSON object): {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{sidecar}: provenance must be a JSON object, got {type(data).__name__}")
    for field in ("name", "kind"):
        if field in data and not isinstance(data[field], str):
            raise DataError(f"{sidecar}, field {field!r}: expected a string, got {data[field]!r}")
    return data


# --------------------------------------------------------------------------------------------------
# Writing


def _write_jsonl(tmp: Path, records: Iterable[tuple[Key, list[float]]], compress: bool) -> None:
    with open(tmp, "wb") as raw:
        handle: io.BufferedIOBase = (
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if compress else raw
        )
        try:
            for (query, item), probs in records:
                line = json.dumps({"query": query, "item": item, "probs": probs}, ensure_ascii=False)
                handle.write(line.encode("utf-8") + b"\n")
        finally:
            if compress:
                handle.close()
        fsync_file(raw)


def _write_parquet(tmp: Path, records: Sequence[tuple[Key, list[float]]]) -> None:
    pa = _import_pyarrow()
    table = pa.table(
        {
            "query": pa.array([key[0] for key, _ in records], type=pa.string()),
            "item": pa.array([key[1] for key, _ in records], type=pa.string()),
            "probs": pa.array([probs for _, probs in records], type=pa.list_(pa.float32())),
        }
    )
    pa.parquet.write_table(table, tmp)


def write_teacher_outputs(
    path: str | os.PathLike[str],
    pairs: Sequence[Pair],
    probs: ArrayLike,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write one record per pair (format from the file ending) and the provenance sidecar.

    Both files are replaced atomically (temp file + ``os.replace``), so a crash never leaves a
    half-written file. With ``provenance=None`` a stale sidecar of an earlier write is removed,
    because it would describe another teacher. ``n_records`` and ``n_grades`` are added to the
    sidecar unless given. Returns the path written.
    """
    target = Path(path)
    fmt = _file_format(target)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(pairs) or p.shape[1] == 0:
        raise InputError(f"probs must be (len(pairs), n_grades) = ({len(pairs)}, C), got shape {p.shape}")
    if provenance is not None and not isinstance(provenance, Mapping):
        raise InputError(f"provenance must be a dict or None, got {type(provenance).__name__}")

    records: list[tuple[Key, list[float]]] = []
    seen: dict[Key, int] = {}
    for i, pair in enumerate(pairs):
        row = p[i].astype(np.float32)
        where = f"pair {i}"
        try:
            _record({"query": pair.query, "item": pair.item, "probs": row.tolist()}, where, p.shape[1])
        except DataError as exc:
            raise InputError(str(exc)) from exc
        if pair.key in seen:
            if not np.array_equal(p[seen[pair.key]].astype(np.float32), row):
                raise InputError(
                    f"pair {i} repeats pair {seen[pair.key]} (query={pair.query!r}, item={pair.item!r}) "
                    "with different probs; a file holds one output per pair"
                )
            continue
        seen[pair.key] = i
        # The shortest text that round-trips the float32 ("0.1", not "0.10000000149011612"):
        # reading it back and casting to float32 gives the same bits.
        records.append((pair.key, [float(str(x)) for x in row]))

    # Serialise the sidecar before touching any file, so a bad provenance changes nothing on disk.
    sidecar_text: str | None = None
    if provenance is not None:
        meta = dict(provenance)
        meta.setdefault("n_records", len(records))
        meta.setdefault("n_grades", int(p.shape[1]))
        try:
            sidecar_text = json.dumps(meta, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        except (TypeError, ValueError) as exc:
            raise InputError(f"provenance must be JSON-serialisable: {exc}") from exc

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        if fmt == "jsonl":
            _write_jsonl(tmp, records, compress=target.name.lower().endswith(".gz"))
        else:
            _write_parquet(tmp, records)

    sidecar = provenance_path(target)
    if sidecar_text is None:
        if sidecar.exists():
            logger.info("removing stale provenance %s (no provenance given)", sidecar)
            sidecar.unlink()
    else:
        atomic_write_text(sidecar, sidecar_text)
    logger.info("wrote %d teacher outputs to %s", len(records), target)
    return target


# --------------------------------------------------------------------------------------------------
# The teacher


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


#: The shipped teacher outputs for every pair of the shipped data, with provenance beside them.
SHIPPED_TEACHER = "teacher_llm.jsonl.gz"


def shipped_teacher_path() -> Path:
    """The teacher file shipped inside the package (grades of every shipped pair)."""
    from importlib import resources

    return Path(str(resources.files("darl_lite") / "data" / SHIPPED_TEACHER))


class FileTeacher:
    """A :class:`~darl_lite.teacher.Teacher` that looks pairs up in precomputed outputs (no model)."""

    def __init__(
        self,
        outputs: Mapping[Key, NDArray[np.float32]],
        *,
        name: str,
        kind: str = "file",
        n_grades: int | None = None,
        source: str | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self._outputs = dict(outputs)
        lengths = {len(v) for v in self._outputs.values()}
        if len(lengths) > 1:
            raise InputError(f"every output must have the same number of grades, got {sorted(lengths)}")
        self.n_grades: int = lengths.pop() if lengths else (n_grades or len(GRADE_NAMES))
        self.source = source

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], name: str | None = None, kind: str | None = None
    ) -> FileTeacher:
        """Load outputs; ``name``/``kind`` default to the sidecar's, then to the file stem / ``"file"``."""
        source = Path(path)
        outputs = read_teacher_outputs(source)
        meta = read_provenance(source) or {}
        n_grades = meta.get("n_grades")
        return cls(
            outputs,
            name=name or meta.get("name") or _default_name(source),
            kind=kind or meta.get("kind") or "file",
            n_grades=n_grades if isinstance(n_grades, int) else None,
            source=str(source),
        )

    def __len__(self) -> int:
        return len(self._outputs)

    def __contains__(self, pair: object) -> bool:
        """Whether a :class:`Pair` (or a ``(query, item)`` key) has an output."""
        key = pair.key if isinstance(pair, Pair) else pair
        return key in self._outputs

    def missing(self, pairs: Iterable[Pair]) -> list[Pair]:
        """The pairs without an output, in input order."""
        return [pair for pair in pairs if pair.key not in self._outputs]

    def covers(self, pairs: Iterable[Pair]) -> bool:
        """Whether every pair has an output (so :meth:`predict_proba` will not raise)."""
        return all(pair.key in self._outputs for pair in pairs)

    def predict_proba(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        """Stored probabilities ``(len(pairs), n_grades)`` in input order; every pair must be present."""
        absent = self.missing(pairs)
        if absent:
            shown = "; ".join(f"(query={p.query!r}, item={p.item!r})" for p in absent[:_SHOW_MISSING])
            more = f" and {len(absent) - _SHOW_MISSING} more" if len(absent) > _SHOW_MISSING else ""
            raise DataError(
                f"{len(absent)} of {len(pairs)} pairs have no output in teacher {self.name!r}"
                f"{f' ({self.source})' if self.source else ''}: {shown}{more}; "
                "grade them with the teacher and add them to the file"
            )
        out = np.empty((len(pairs), self.n_grades), dtype=np.float32)
        for i, pair in enumerate(pairs):
            out[i] = self._outputs[pair.key]
        return out

    def __repr__(self) -> str:
        return f"FileTeacher(name={self.name!r}, kind={self.kind!r}, n_pairs={len(self)})"
