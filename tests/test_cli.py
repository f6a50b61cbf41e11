"""The command line on a real bundle: score, inspect, and errors that say what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from darl_lite.cli import main


def test_score_prints_a_ranked_table(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.txt"
    items.write_text("Mapo doufu\n\nAfghan cuisine\nKung Pao chicken\n", encoding="utf-8")
    assert (
        main(["score", str(tiny_bundle_dir), "--query", "Szechwan dish food cuisine", "--items", str(items)])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["expected", "grade", "ood", "ood%", "routed", "item"]
    assert all(line.split()[3].endswith("%") for line in out[1:])  # the OOD percentile beside the raw score
    assert len(out) == 4  # header + three non-empty items
    expected = [float(line.split()[0]) for line in out[1:]]
    assert expected == sorted(expected, reverse=True)


def test_score_json(tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = tmp_path / "items.txt"
    items.write_text("Mapo doufu\nAfghan cuisine\n", encoding="utf-8")
    args = [
        "score",
        str(tiny_bundle_dir),
        "--query",
        "q",
        "--items",
        str(items),
        "--json",
        "--precision",
        "fp32",
    ]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["item"] for r in rows] == ["Mapo doufu", "Afghan cuisine"]
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-6 and r["source"] == "student" for r in rows)


def test_inspect_prints_the_manifest(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_bundle_dir)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["format"] == "darl-lite-bundle" and "calibration" in manifest


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_query_is_an_error(
    tiny_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.txt"
    items.write_text("x\n", encoding="utf-8")
    assert main(["score", str(tiny_bundle_dir), "--query", " ", "--items", str(items)]) == 2
    assert "query is empty" in capsys.readouterr().err


def test_unknown_option_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quickstart", "--epoch", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_serve_refuses_an_unset_token_variable(
    tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DARL_TEST_TOKEN", raising=False)
    assert main(["serve", str(tiny_bundle_dir), "--token-env", "DARL_TEST_TOKEN"]) == 2
    assert "DARL_TEST_TOKEN" in capsys.readouterr().err
