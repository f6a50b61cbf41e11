"""The session-start install check: a package of darl-lite[all] that is missing fails the run."""

from __future__ import annotations

import importlib.metadata

import pytest
from install_check import RUNTIME_ONLY_ENV, check_install, missing_all_requirements


def test_this_environment_has_all_of_all() -> None:
    assert missing_all_requirements() == []
    assert check_install() is None


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def without_fastapi(name: str) -> str:
        if name == "fastapi":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_fastapi)
    assert missing_all_requirements() == ["fastapi"]
    assert "missing: fastapi" in (check_install() or "")
    monkeypatch.setenv(RUNTIME_ONLY_ENV, "runtime")
    assert check_install() is None
