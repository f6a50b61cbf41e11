"""A cache directory described by its ``meta.json``: reused only for an identical spec.

The LLM feature cache (:mod:`darl_lite.distill.llm_features`) and the cut cache
(:mod:`darl_lite.distill.cut_cache`) both store chunks of expensive states under one spec (model
hash, template, layers or cut, pairs hash, ...); a directory of another run is refused, never mixed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darl_lite.atomic import atomic_write_json
from darl_lite.errors import InputError

META_NAME = "meta.json"


def prepare_cache_dir(cache_dir: Path, spec: Mapping[str, Any], what: str) -> None:
    """Create ``cache_dir`` with ``spec`` as its meta, or check an existing one holds the same spec."""
    meta_path = cache_dir / META_NAME
    if meta_path.exists():
        found = json.loads(meta_path.read_text(encoding="utf-8"))
        if found != dict(spec):
            diff = sorted(k for k in {*spec, *found} if found.get(k) != spec.get(k))
            raise InputError(
                f"{cache_dir} holds {what} of a different run (differs in {', '.join(diff)}; see "
                f"{meta_path}); use another cache directory or delete this one"
            )
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, dict(spec), indent=2)


__all__ = ["META_NAME", "prepare_cache_dir"]
