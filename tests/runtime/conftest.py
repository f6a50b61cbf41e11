"""The committed tiny bundle (tests/fixtures/tiny_bundle, built by tests/fixtures/make_tiny_bundle.py):
the runtime tests here need no torch, as on a search node that installs only the runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from darl_lite.inference import SessionConfig
from darl_lite.scorer import Scorer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bundle"


@pytest.fixture(scope="session")
def committed_bundle() -> Path:
    """The committed bundle's directory (read-only: copy it with ``bundle_dir_copy`` to damage it)."""
    if not (FIXTURE / "manifest.json").is_file():
        pytest.fail(f"{FIXTURE} is missing: rebuild it with python tests/fixtures/make_tiny_bundle.py")
    return FIXTURE


@pytest.fixture()
def bundle_dir_copy(committed_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(committed_bundle, target)
    return target


@pytest.fixture(scope="session")
def fixture_scorer(committed_bundle: Path) -> Scorer:
    return Scorer.load(committed_bundle, session=SessionConfig(intra_op_threads=1))
