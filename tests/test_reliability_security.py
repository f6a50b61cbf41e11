"""Security: no user file is ever unpickled, the server binds loopback by default.

* A bundle's OOD statistics are read with ``np.load(allow_pickle=False)``: an ``.npz`` whose array
  is an object array (a pickle inside the zip) is refused with :class:`BundleError`, and the pickle
  never runs, even when the manifest's sha256 matches (a bundle re-signed by whoever forged it).
* A static scan of the shipped packages finds no ``pickle``/``marshal``/``shelve``/``dill``/
  ``joblib``, no ``eval``/``exec``, no ``yaml.load``, no ``np.load(allow_pickle=True)`` and no
  ``torch.load`` without ``weights_only=True``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darl_lite import BundleError, Scorer
from darl_lite.bundle import MANIFEST_NAME, load_bundle, sha256_of
from darl_lite.cli import build_parser
from darl_lite.ood import MahalanobisDetector

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("darl_lite", "distill", "export")


class _Payload:
    """Unpickling this would create ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _forged_npz(path: Path, marker: Path) -> None:
    """An .npz whose ``means`` is an object array: numpy stores it as a pickle inside the zip."""
    means = np.empty(2, dtype=object)
    means[:] = [_Payload(marker), _Payload(marker)]
    with open(path, "wb") as handle:
        np.savez(handle, means=means, precision=np.eye(2))


def test_object_array_in_the_ood_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    _forged_npz(tmp_path / "ood.npz", marker)
    with pytest.raises(BundleError, match=r"OOD statistics .*ood\.npz are unreadable.*allow_pickle=False"):
        MahalanobisDetector.load(tmp_path / "ood.npz")
    assert not marker.exists()
    # The guard is numpy's: with pickles allowed, the payload would have run.
    with np.load(tmp_path / "ood.npz", allow_pickle=True) as data:
        data["means"]
    assert marker.exists()


def test_a_resigned_bundle_with_a_pickled_ood_file_is_refused_at_load(
    bundle_copy: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pickle-ran"
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    entry = manifest["files"]["ood.int8"]
    target = bundle_copy / entry["path"]
    _forged_npz(target, marker)
    entry.update(sha256=sha256_of(target), size=target.stat().st_size)  # forged, and re-signed
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    load_bundle(bundle_copy)  # the hashes now match: only the reader stands in the way
    with pytest.raises(BundleError, match=r"ood_int8\.npz are unreadable"):
        Scorer.load(bundle_copy, precision="int8")
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                found.append((func.id, node))
            elif isinstance(func, ast.Attribute):
                base = func.value.id if isinstance(func.value, ast.Name) else "?"
                found.append((f"{base}.{func.attr}", node))
    return found


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_code_reads_a_file_with_pickle_or_evaluates_text() -> None:
    unsafe_modules = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
    problems = []
    files = [p for package in SHIPPED for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            if names & unsafe_modules:
                problems.append(f"{where}:{node.lineno} imports {sorted(names & unsafe_modules)}")
        for name, call in _calls(tree):
            line = f"{where}:{call.lineno} {name}"
            if name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{line}: evaluates text")
            elif name.endswith("yaml.load") or name in ("yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{line}: yaml.load (use yaml.safe_load)")
            elif name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is not False:
                problems.append(f"{line}: np.load without allow_pickle=False")
            elif name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{line}: torch.load without weights_only=True")
    assert not problems, "\n".join(problems)


def test_the_server_binds_loopback_by_default() -> None:
    from darl_lite.serve import ServeConfig

    assert ServeConfig().host == "127.0.0.1"
    args = build_parser().parse_args(["serve", "bundle"])
    assert args.host == "127.0.0.1" and args.token_env is None
    assert (args.max_items, args.max_body_bytes) == (1000, 1_000_000)
