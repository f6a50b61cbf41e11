"""`darl-lite score` and `darl-lite inspect` on the committed tiny bundle, in a subprocess (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ITEMS = ["szechwan dish", "football club", "planet star"]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "darl_lite.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_score_json_lists_every_item(committed_bundle: Path, tmp_path: Path) -> None:
    items = tmp_path / "items.txt"
    items.write_text("\n".join(ITEMS) + "\n", encoding="utf-8")
    done = _cli("score", str(committed_bundle), "--query", "szechwan food", "--items", str(items), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["item"] for r in rows] == ITEMS
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-6 and r["source"] == "student" for r in rows)


def test_score_table_from_stdin(committed_bundle: Path) -> None:
    done = _cli(
        "score", str(committed_bundle), "--query", "szechwan food", "--items", "-", stdin="\n".join(ITEMS)
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 + len(ITEMS) and "item" in lines[0]
    assert sorted(line.split()[-1] for line in lines[1:]) == sorted(i.split()[-1] for i in ITEMS)


def test_inspect_verifies_and_prints_the_manifest(committed_bundle: Path, bundle_dir_copy: Path) -> None:
    done = _cli("inspect", str(committed_bundle))
    assert done.returncode == 0, done.stderr
    assert "model_int8.onnx" in done.stdout
    (bundle_dir_copy / "ood_int8.npz").write_bytes(b"not the statistics")
    bad = _cli("inspect", str(bundle_dir_copy))
    assert bad.returncode != 0 and "ood_int8.npz" in bad.stderr and "Traceback" not in bad.stderr
