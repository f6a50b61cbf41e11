"""Fail the test session, loudly, when the environment lacks a package that ``[all]`` installs.

The suite runs in an environment built with ``pip install -e ".[all]"``; a test that skipped itself
because, say, fastapi is missing would turn a broken install into a green run. The requirement list
is read from the installed ``darl-lite`` metadata (what pyproject.toml declares), so it never drifts
from the extras. The runtime-only CI run (``DARL_LITE_TESTS=runtime``: ``pip install .[serve]``,
tests/runtime only) is the one place where most of ``[all]`` is absent on purpose.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

RUNTIME_ONLY_ENV = "DARL_LITE_TESTS"

_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?")


def _requirements_by_extra() -> dict[str, list[tuple[str, list[str]]]]:
    """``{extra: [(distribution, [its extras]), ...]}`` from darl-lite's installed metadata."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for line in importlib.metadata.requires("darl-lite") or []:
        requirement, _, marker = line.partition(";")
        extra = _EXTRA.search(marker)
        name = _NAME.match(requirement)
        if name is None:
            continue
        extras = [e.strip() for e in (name.group(2) or "").split(",") if e.strip()]
        out.setdefault(extra.group(1) if extra else "", []).append((name.group(1), extras))
    return out


def missing_all_requirements() -> list[str]:
    """Distributions that ``darl-lite[all]`` requires and this environment lacks (sorted)."""
    by_extra = _requirements_by_extra()
    wanted: set[str] = {name for name, _ in by_extra.get("", [])}
    todo, seen = ["all"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for name, extras in by_extra.get(extra, []):
            if name.lower().replace("_", "-") == "darl-lite":
                todo.extend(extras)
            else:
                wanted.add(name)
    missing = []
    for name in sorted(wanted):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def check_install() -> str | None:
    """Why the session must stop (a message naming the missing packages), or None."""
    if os.environ.get(RUNTIME_ONLY_ENV) == "runtime":
        return None
    try:
        missing = missing_all_requirements()
    except importlib.metadata.PackageNotFoundError:
        return 'darl-lite is not installed in this environment; run: pip install -e ".[all]"'
    if missing:
        return (
            f"packages that darl-lite[all] requires are missing: {', '.join(missing)}. The suite "
            'needs the full install (pip install -e ".[all]"); it does not skip tests for them. '
            f"For the runtime-only tests set {RUNTIME_ONLY_ENV}=runtime and run tests/runtime."
        )
    return None
