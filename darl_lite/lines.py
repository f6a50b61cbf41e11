"""Reading line-based data files (plain or ``.gz``) as UTF-8, with the file and line in every error.

The one home of the line reader that pair files (:mod:`darl_lite.datasets`) and teacher files
(:mod:`darl_lite.teacher_file`) use. Lines are decoded one at a time, so a bad byte is reported
with its physical line number instead of failing the whole file, and a corrupt gzip stream is
reported with the last good line.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from darl_lite.errors import DataError

__all__ = ["decoded_lines", "jsonl_objects", "open_binary"]


def open_binary(path: Path) -> io.BufferedIOBase:
    """``path`` opened for binary reading, through gzip when its name ends in ``.gz``."""
    try:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}") from exc


def decoded_lines(handle: io.BufferedIOBase, path: Path) -> Iterator[tuple[int, str]]:
    """(1-based physical line number, text with its newline), decoding UTF-8 line by line.

    A UTF-8 byte-order mark at the start of the file is dropped.
    """
    number = 0
    while True:
        try:
            raw = handle.readline()
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: unreadable after line {number} (corrupt gzip?): {exc}") from exc
        if not raw:
            return
        number += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}, line {number}: invalid UTF-8 at byte {exc.start} of the line; "
                "save the file as UTF-8"
            ) from exc
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield number, text


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each non-blank line of a JSONL file; ``where`` is ``"<path>, line N"``.

    Raises :class:`DataError` naming the line for invalid JSON or a line that is not an object.
    """
    with open_binary(path) as handle:
        for number, text in decoded_lines(handle, path):
            if not text.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
