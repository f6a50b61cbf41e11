"""Graded pairs in: the shipped DBpedia-Entity v2 splits and a user's own CSV / JSONL / Parquet files.

Splits are always by query, never by row: a query seen in training must not be graded at test time,
or the student's scores measure memorised queries. Every malformed row fails with a
:class:`~darl_lite.errors.DataError` naming the file, the line, the field and the rule, because a
distillation run that silently drops rows is worse than one that stops.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darl_lite.errors import DataError, InputError, MissingExtraError
from darl_lite.lines import decoded_lines, jsonl_objects, open_binary
from darl_lite.types import GRADE_NAMES, Pair

logger = logging.getLogger(__name__)

DBPEDIA_DIR = Path(__file__).parent / "data" / "dbpedia_entity_v2"

#: Keyword-style query classes: the distribution the student is trained and tested on.
ID_CLASSES: tuple[str, ...] = ("SemSearch_ES", "INEX_LD", "ListSearch")
#: Natural-language questions: the held-out distribution shift for the OOD detector.
OOD_CLASSES: tuple[str, ...] = ("QALD2",)
#: Fold file of each class (upstream spells the file names with hyphens, the ids with underscores).
_FOLD_FILES: dict[str, str] = {
    "SemSearch_ES": "SemSearch-ES.json",
    "INEX_LD": "INEX-LD.json",
    "ListSearch": "ListSearch.json",
    "QALD2": "QALD2.json",
}
N_FOLDS = 5

#: File suffixes :func:`load_pairs` reads, and the format each means.
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".parquet": "parquet",
}

SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "id_test", "ood_train", "ood_dev", "ood_test")


@dataclass(frozen=True)
class Splits:
    """Query-disjoint splits of graded pairs; ``ood_*`` hold out-of-distribution queries only.

    ``ood_train`` is kept apart from ``train`` on purpose: it is the unlabeled pool for later
    stages (e.g. teacher pseudo-labels), never part of the student's supervised data.
    """

    train: tuple[Pair, ...]
    dev: tuple[Pair, ...]
    id_test: tuple[Pair, ...]
    ood_train: tuple[Pair, ...]
    ood_dev: tuple[Pair, ...]
    ood_test: tuple[Pair, ...]

    def split(self, name: str) -> tuple[Pair, ...]:
        """The pairs of one split by name (one of :data:`SPLIT_NAMES`)."""
        if name not in SPLIT_NAMES:
            raise InputError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        pairs: tuple[Pair, ...] = getattr(self, name)
        return pairs

    @property
    def sizes(self) -> dict[str, int]:
        """Number of pairs per split, in :data:`SPLIT_NAMES` order (plain ints, JSON-ready)."""
        return {name: len(self.split(name)) for name in SPLIT_NAMES}

    def query_ids(self, name: str) -> frozenset[str]:
        """The query ids of one split, to check disjointness or to count queries."""
        return frozenset(p.query_id for p in self.split(name) if p.query_id is not None)

    def all_pairs(self) -> Iterator[Pair]:
        """Every pair exactly once, split after split."""
        for name in SPLIT_NAMES:
            yield from self.split(name)


# --------------------------------------------------------------------------------------------------
# The shipped DBpedia-Entity v2 data


@functools.lru_cache(maxsize=1)
def _dbpedia_pairs() -> tuple[Pair, ...]:
    """All 49,280 judgments, parsed once per process (Pair is immutable, so sharing is safe)."""
    path = DBPEDIA_DIR / "judgments.csv.gz"
    if not path.is_file():
        raise DataError(f"the shipped judgments {path} are missing; reinstall darl-lite")
    return tuple(
        load_pairs(
            path,
            query_col="query",
            item_col="entity_title",
            grade_col="grade",
            query_id_col="query_id",
            query_class_col="query_class",
            n_grades=len(GRADE_NAMES),
        )
    )


def _read_fold(query_class: str, fold: int) -> tuple[list[str], list[str]]:
    """The (training, testing) query ids of one class in one official fold."""
    path = DBPEDIA_DIR / "folds" / _FOLD_FILES[query_class]
    try:
        folds = json.loads(path.read_text(encoding="utf-8"))
        entry = folds[str(fold)]
        training, testing = list(entry["training"]), list(entry["testing"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"fold file {path} is unreadable or lacks fold {fold} with 'training' and 'testing': {exc}"
        ) from exc
    return training, testing


def _dev_queries(training: list[str], dev_fraction: float, seed: int, query_class: str) -> set[str]:
    """A seeded ``dev_fraction`` of a class's training queries, independent of the other classes."""
    n_dev = round(dev_fraction * len(training))
    # Seed per class (crc32 is stable across runs, unlike hash()) so adding a class moves nothing.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(query_class.encode()))
    return set(rng.sample(sorted(training), n_dev))


def load_dbpedia(fold: int = 0, dev_fraction: float = 0.15, seed: int = 0) -> Splits:
    """Split the shipped DBpedia-Entity v2 judgments by query along an official fold.

    test = the fold's testing queries; dev = a seeded ``dev_fraction`` of each class's training
    queries; train = the rest. Keyword classes (:data:`ID_CLASSES`) fill ``train``/``dev``/``id_test``,
    QALD2 (:data:`OOD_CLASSES`) fills ``ood_train``/``ood_dev``/``ood_test``. A query that a fold
    file lists on neither side (upstream INEX-LD fold 1 omits ``INEX_LD-2012343``) is treated as a
    training query, so every judgment lands in exactly one split.
    """
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < N_FOLDS:
        raise InputError(f"fold must be an integer in [0, {N_FOLDS}), got {fold!r}")
    if not 0.0 <= dev_fraction < 1.0:
        raise InputError(f"dev_fraction must be in [0, 1), got {dev_fraction!r}")

    pairs = _dbpedia_pairs()
    ids_by_class: dict[str, set[str]] = {}
    for pair in pairs:
        ids_by_class.setdefault(str(pair.query_class), set()).add(str(pair.query_id))
    unknown = set(ids_by_class) - set(_FOLD_FILES)
    if unknown:
        raise DataError(f"judgments hold query classes without a fold file: {sorted(unknown)}")

    split_of: dict[str, str] = {}
    for query_class in (*ID_CLASSES, *OOD_CLASSES):
        prefix = "ood_" if query_class in OOD_CLASSES else ""
        known = ids_by_class.get(query_class, set())
        training, testing = _read_fold(query_class, fold)
        listed = set(training) | set(testing)
        if set(training) & set(testing):
            raise DataError(
                f"{query_class} fold {fold} lists queries on both sides: "
                f"{sorted(set(training) & set(testing))[:5]}"
            )
        stray = listed - known
        if stray:
            raise DataError(
                f"{query_class} fold {fold} lists {len(stray)} query ids absent from the judgments, "
                f"e.g. {sorted(stray)[:5]}"
            )
        unlisted = sorted(known - listed)
        if unlisted:
            logger.info(
                "%s fold %d lists neither side for %s; treating as training", query_class, fold, unlisted
            )
        training = sorted(set(training) | set(unlisted))
        dev = _dev_queries(training, dev_fraction, seed, query_class)
        for qid in training:
            split_of[qid] = prefix + ("dev" if qid in dev else "train")
        for qid in testing:
            split_of[qid] = prefix + ("test" if prefix else "id_test")

    buckets: dict[str, list[Pair]] = {name: [] for name in SPLIT_NAMES}
    for pair in pairs:
        buckets[split_of[str(pair.query_id)]].append(pair)
    splits = Splits(**{name: tuple(bucket) for name, bucket in buckets.items()})
    logger.debug("DBpedia-Entity v2 fold %d: %s", fold, splits.sizes)
    return splits


# --------------------------------------------------------------------------------------------------
# A user's own pairs


@dataclass(frozen=True)
class _Columns:
    """Which source field feeds which Pair field, and the grade scheme rows are checked against."""

    query: str
    item: str
    grade: str | None
    query_id: str | None
    query_class: str | None
    n_grades: int

    def required(self) -> list[str]:
        names = [self.query, self.item, self.grade, self.query_id, self.query_class]
        return [name for name in names if name is not None]


def _suffix_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUPPORTED_SUFFIXES[suffix]
    raise DataError(f"{path}: unsupported file type; supported endings are {', '.join(SUPPORTED_SUFFIXES)}")


def _parse_grade(value: Any, where: str, field: str, n_grades: int) -> int:
    """An integer grade in ``[0, n_grades)`` from an int, an integral float or an integer string."""
    rule = f"grade must be an integer in [0, {n_grades})"
    grade: int | None = None
    if isinstance(value, bool) or value is None:
        grade = None
    elif isinstance(value, int):
        grade = value
    elif isinstance(value, float):
        if math.isnan(value):
            raise DataError(f"{where}, field {field!r}: grade is NaN; {rule}")
        grade = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in {"nan", "+nan", "-nan"}:
            raise DataError(f"{where}, field {field!r}: grade is NaN; {rule}")
        try:
            grade = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            grade = int(number) if number.is_integer() else None
    if grade is None or not 0 <= grade < n_grades:
        shown = "missing" if value is None or value == "" else repr(value)
        raise DataError(f"{where}, field {field!r}: {rule}, got {shown}")
    return grade


def _parse_text(value: Any, where: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}, field {field!r}: value is missing; expected a non-empty string")
    if not isinstance(value, str):
        raise DataError(f"{where}, field {field!r}: expected a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataError(f"{where}, field {field!r}: value is empty or whitespace; expected text")
    return value


def _parse_label(value: Any) -> str | None:
    """Query ids and classes: strings or integers, kept as text; empty means unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _row_to_pair(row: Mapping[str, Any], where: str, columns: _Columns) -> Pair:
    """The one validation every format shares: one source row to one checked :class:`Pair`."""
    missing = [name for name in columns.required() if name not in row]
    if missing:
        raise DataError(
            f"{where}: missing field {missing[0]!r}; fields found: {', '.join(map(repr, row)) or 'none'}"
        )
    return Pair(
        query=_parse_text(row[columns.query], where, columns.query),
        item=_parse_text(row[columns.item], where, columns.item),
        grade=(
            None
            if columns.grade is None
            else _parse_grade(row[columns.grade], where, columns.grade, columns.n_grades)
        ),
        query_id=None if columns.query_id is None else _parse_label(row[columns.query_id]),
        query_class=None if columns.query_class is None else _parse_label(row[columns.query_class]),
    )


def _missing_columns_error(path: Path, found: Iterable[str], columns: _Columns) -> DataError | None:
    found = list(found)
    missing = [name for name in columns.required() if name not in found]
    if not missing:
        return None
    hint = " (pass grade_col=None for unlabeled pairs)" if missing == [columns.grade] else ""
    return DataError(
        f"{path}: missing column(s) {', '.join(map(repr, missing))}{hint}; "
        f"columns found: {', '.join(map(repr, found)) or 'none'}"
    )


def _read_csv(path: Path, columns: _Columns) -> list[Pair]:
    pairs: list[Pair] = []
    with open_binary(path) as handle:
        lines = decoded_lines(handle, path)
        current = [0]

        def texts() -> Iterator[str]:
            for number, text in lines:
                current[0] = number
                yield text

        reader = csv.reader(texts())
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file; expected a header line naming the columns")
            error = _missing_columns_error(path, header, columns)
            if error is not None:
                raise error
            while True:
                start = current[0] + 1
                row = next(reader, None)
                if row is None:
                    break
                if not row:  # a blank line
                    continue
                where = f"{path}, line {start}"
                if len(row) != len(header):
                    raise DataError(
                        f"{where}: {len(row)} fields, but the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                pairs.append(_row_to_pair(dict(zip(header, row, strict=True)), where, columns))
        except csv.Error as exc:
            raise DataError(f"{path}, line {current[0]}: malformed CSV: {exc}") from exc
    return pairs


def _read_jsonl(path: Path, columns: _Columns) -> list[Pair]:
    return [_row_to_pair(record, where, columns) for where, record in jsonl_objects(path)]


def _read_parquet(path: Path, columns: _Columns) -> list[Pair]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtraError.for_module("pyarrow", "distill") from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid subclasses ValueError
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    error = _missing_columns_error(path, table.column_names, columns)
    if error is not None:
        raise error
    data = {name: table.column(name).to_pylist() for name in columns.required()}
    return [
        _row_to_pair({name: values[i] for name, values in data.items()}, f"{path}, row {i}", columns)
        for i in range(table.num_rows)
    ]


def load_pairs(
    path: str | os.PathLike[str],
    *,
    query_col: str = "query",
    item_col: str = "item",
    grade_col: str | None = "grade",
    query_id_col: str | None = None,
    query_class_col: str | None = None,
    n_grades: int = len(GRADE_NAMES),
) -> list[Pair]:
    """Read graded (or, with ``grade_col=None``, unlabeled) pairs from CSV, JSONL or Parquet.

    The format follows the file ending (see :data:`SUPPORTED_SUFFIXES`; ``.gz`` is decompressed).
    Texts are kept exactly as written. Errors name the line: 1-based physical lines (the CSV
    header is line 1), or the 0-based row index for Parquet. A file with no data rows gives ``[]``.
    """
    if isinstance(n_grades, bool) or not isinstance(n_grades, int) or n_grades < 1:
        raise InputError(f"n_grades must be a positive integer, got {n_grades!r}")
    source = Path(path)
    fmt = _suffix_format(source)
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    columns = _Columns(query_col, item_col, grade_col, query_id_col, query_class_col, n_grades)
    if fmt == "csv":
        pairs = _read_csv(source, columns)
    elif fmt == "jsonl":
        pairs = _read_jsonl(source, columns)
    else:
        pairs = _read_parquet(source, columns)
    logger.debug("read %d pairs from %s", len(pairs), source)
    return pairs
