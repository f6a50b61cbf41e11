"""Atomic, durable file and directory writes: a crash never leaves a half-written file in place.

The one home of the write-beside, fsync, rename pattern that bundles, teacher files, checkpoints
and labeling progress use. A file is written to a temporary name in the same directory (so the
rename stays on one file system), flushed and fsynced, then renamed onto its target; a directory
is filled in a staging directory beside its target and renamed into position.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "replace_dir",
    "staging_dir",
    "write_json_durably",
]


def fsync_file(handle: IO[Any]) -> None:
    """Flush ``handle`` and fsync its file, so its bytes are on disk before a rename publishes it."""
    handle.flush()
    os.fsync(handle.fileno())


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename inside it survives a power cut (skipped where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it only if the body succeeds.

    The body writes (and should fsync) the temporary file; on an exception it is removed and
    ``path`` is left as it was.
    """
    target = Path(path)
    # Not mkstemp: its 0600 mode would stick to the final file; a unique name under the umask instead.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        fsync_file(handle)


def write_json_durably(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> None:
    """Write ``obj`` as JSON (``json.dump`` keywords in ``dumps``) plus a newline, then fsync.

    Not atomic by itself: for a file inside a staging directory that is renamed as a whole.
    """
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, **dumps)
        handle.write("\n")
        fsync_file(handle)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically and durably (keywords go to ``json.dump``)."""
    with atomic_path(path) as tmp:
        write_json_durably(tmp, obj, **dumps)


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A fresh directory inside ``parent`` to fill before it is renamed into position.

    Removed, with whatever was written into it, if the body raises; after a successful rename
    there is nothing left to remove.
    """
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``, replacing an existing ``target`` directory.

    An existing target is first moved aside to ``.<name>.old`` and removed after the swap, so at
    every moment either the old or the new directory sits at ``target``.
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
