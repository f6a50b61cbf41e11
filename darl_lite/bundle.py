"""The bundle: one directory that holds everything the runtime needs, described by ``manifest.json``.

One saver (:func:`write_bundle`) and one loader (:func:`load_bundle`). The loader checks the format
version, then the size and sha256 of every file the manifest lists, before anything is used, and
names the file and the reason when it refuses. File names live in the manifest, never in code.
The saver writes into a temporary sibling directory and renames it into place, so a half-written
bundle can never be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from darl_lite.atomic import replace_dir, staging_dir, write_json_durably
from darl_lite.errors import BundleError

BUNDLE_FORMAT = "darl-lite-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: Roles of the files a bundle may carry: ``tokenizer``; per precision (``int8``, ``fp32``) an ONNX
#: graph ``model.<precision>`` and its OOD statistics ``ood.<precision>``.
ROLE_TOKENIZER = "tokenizer"


def model_role(precision: str) -> str:
    """The file role of the ONNX graph of one precision (``int8`` or ``fp32``)."""
    return f"model.{precision}"


def ood_role(precision: str) -> str:
    """The file role of the OOD statistics fitted on one precision's representations."""
    return f"ood.{precision}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and parsed manifest."""

    directory: Path
    manifest: dict[str, Any]

    def path_of(self, role: str) -> Path:
        """The path of the file with this role; a clear error if the bundle has none."""
        files = self.manifest["files"]
        if role not in files:
            raise BundleError(
                f"bundle {self.directory} has no {role!r} file; it carries: {', '.join(sorted(files))}"
            )
        return self.directory / files[role]["path"]

    @property
    def precisions(self) -> list[str]:
        return sorted(r.split(".", 1)[1] for r in self.manifest["files"] if r.startswith("model."))

    @property
    def grade_names(self) -> list[str]:
        return list(self.manifest["grades"]["names"])

    @property
    def grade_gains(self) -> list[float]:
        return [float(g) for g in self.manifest["grades"]["gains"]]

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in (
        "darl-lite",
        "numpy",
        "onnxruntime",
        "tokenizers",
        "onnx",
        "torch",
        "transformers",
        "optimum",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_bundle(
    directory: str | os.PathLike[str],
    files: Mapping[str, str | os.PathLike[str]],
    manifest: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically and return it, loaded back and verified.

    ``files`` maps a role (``model.int8``, ``model.fp32``, ``tokenizer``, ``ood``…) to a source file,
    copied under its own base name. ``manifest`` holds every other field (grades, max_length,
    calibration, ood, routing, …); ``format``, ``format_version``, ``created``, ``package_versions``
    and ``files`` are filled in here.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    missing = [f"{role}: {src}" for role, src in files.items() if not Path(src).is_file()]
    if missing:
        raise BundleError("cannot write bundle, source files missing: " + "; ".join(missing))
    names = [Path(src).name for src in files.values()]
    if len(set(names)) != len(names) or MANIFEST_NAME in names:
        raise BundleError(f"bundle file names must be distinct and not {MANIFEST_NAME}: {names}")

    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target.parent, prefix=f".{target.name}.") as staging:
        entries: dict[str, dict[str, Any]] = {}
        for role, src in files.items():
            dest = staging / Path(src).name
            shutil.copyfile(src, dest)
            entries[role] = {"path": dest.name, "sha256": sha256_of(dest), "size": dest.stat().st_size}
        full = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_versions": _package_versions(),
            **{k: v for k, v in manifest.items() if k not in {"format", "format_version", "files"}},
            "files": entries,
        }
        write_json_durably(staging / MANIFEST_NAME, full, indent=2, sort_keys=False)
        replace_dir(staging, target)
    return load_bundle(target)


def load_bundle(directory: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Load and verify a bundle; refuse it with the file and the reason if anything is off."""
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist (build one with `darl-lite export`)")
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a darl-lite bundle: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path} is not a darl-lite manifest (format != {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {version!r}; this darl-lite reads version "
            f"{FORMAT_VERSION}: re-export the bundle or install the darl-lite release that wrote it"
        )
    for key in ("files", "grades", "max_length"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks the required field {key!r}")
    if verify:
        for role, entry in manifest["files"].items():
            path = root / entry["path"]
            if Path(entry["path"]).name != entry["path"]:
                raise BundleError(f"{manifest_path}: file {entry['path']!r} ({role}) must sit in the bundle")
            if not path.is_file():
                raise BundleError(f"bundle file {path} ({role}) is missing")
            size = path.stat().st_size
            if size != entry["size"]:
                raise BundleError(
                    f"bundle file {path} ({role}) is {size} bytes, the manifest says {entry['size']}: "
                    "truncated or replaced"
                )
            if sha256_of(path) != entry["sha256"]:
                raise BundleError(
                    f"bundle file {path} ({role}) does not match its sha256 in the manifest: "
                    "it was modified after export; re-export the bundle"
                )
    return Bundle(directory=root, manifest=manifest)
