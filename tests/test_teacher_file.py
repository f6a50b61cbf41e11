"""Precomputed teacher outputs: exact round trips, atomic writes, and errors that name line and field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from darl_lite.errors import DataError, InputError, MissingExtraError
from darl_lite.teacher import Teacher
from darl_lite.teacher_file import (
    FileTeacher,
    provenance_path,
    read_provenance,
    read_teacher_outputs,
    write_teacher_outputs,
)
from darl_lite.types import Pair

PAIRS = [
    Pair("jazz", "Miles Davis", 2),
    Pair("jazz", "Apple pie", 0),
    Pair("who wrote Ulysses", "James Joyce"),
]
PROBS = np.array([[0.05, 0.15, 0.8], [0.9, 0.07, 0.03], [1 / 3, 1 / 3, 1 / 3]])
PROVENANCE = {
    "name": "qwen-grader-v3",
    "kind": "llm",
    "model_sha256": "ab" * 32,
    "recipe": "darl",
    "command": "grade --split train",
    "date": "2025-01-01",
}


def _formats() -> list[str]:
    names = ["t.jsonl", "t.jsonl.gz"]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return names
    return [*names, "t.parquet"]


@pytest.mark.parametrize("name", _formats())
def test_round_trip_is_exact_in_float32(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_teacher_outputs(path, PAIRS, PROBS, PROVENANCE)
    outputs = read_teacher_outputs(path)
    assert list(outputs) == [p.key for p in PAIRS]
    for pair, row in zip(PAIRS, PROBS, strict=True):
        assert outputs[pair.key].dtype == np.float32
        np.testing.assert_array_equal(outputs[pair.key], row.astype(np.float32))
    teacher = FileTeacher.from_file(path)
    assert (teacher.name, teacher.kind) == ("qwen-grader-v3", "llm")
    got = teacher.predict_proba(PAIRS[::-1])
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_array_equal(got, PROBS[::-1].astype(np.float32))
    # no temporary file is left beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name + ".provenance.json"])


def test_jsonl_is_readable_text_with_short_floats(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_teacher_outputs(path, PAIRS[:1], PROBS[:1])
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "query": "jazz",
        "item": "Miles Davis",
        "probs": [0.05, 0.15, 0.8],
    }


def test_sidecar_holds_provenance_plus_counts(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_teacher_outputs(path, PAIRS, PROBS, PROVENANCE)
    assert provenance_path(path) == tmp_path / "t.jsonl.provenance.json"
    assert read_provenance(path) == {**PROVENANCE, "n_records": 3, "n_grades": 3}
    # rewriting without provenance removes the stale sidecar, which described another teacher
    write_teacher_outputs(path, PAIRS, PROBS, None)
    assert read_provenance(path) is None
    teacher = FileTeacher.from_file(path)
    assert (teacher.name, teacher.kind) == ("t", "file")
    named = FileTeacher.from_file(path, name="mine", kind="stand-in")
    assert (named.name, named.kind) == ("mine", "stand-in")


def test_file_teacher_is_a_teacher_and_reports_coverage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_teacher_outputs(path, PAIRS[:2], PROBS[:2])
    teacher = FileTeacher.from_file(path)
    assert isinstance(teacher, Teacher)
    assert len(teacher) == 2
    assert PAIRS[0] in teacher and ("jazz", "Apple pie") in teacher
    assert PAIRS[2] not in teacher
    # grade and ids do not take part in the lookup, only the two texts
    assert Pair("jazz", "Miles Davis", None, "q9", "x") in teacher
    assert teacher.covers(PAIRS[:2]) and not teacher.covers(PAIRS)
    assert teacher.missing(PAIRS) == [PAIRS[2]]
    assert teacher.predict_proba([]).shape == (0, 3)


def test_missing_pairs_are_counted_and_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_teacher_outputs(path, PAIRS[:1], PROBS[:1], {"name": "g"})
    teacher = FileTeacher.from_file(path)
    absent = [Pair("q", f"item {i}") for i in range(5)]
    with pytest.raises(DataError) as info:
        teacher.predict_proba([PAIRS[0], *absent])
    message = str(info.value)
    assert message.startswith("5 of 6 pairs have no output in teacher 'g'")
    assert "item='item 0'" in message and "item='item 2'" in message and "and 2 more" in message
    assert "item 3" not in message


GOOD = '{"query": "q", "item": "a", "probs": [0.2, 0.3, 0.5]}'


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"query": "q", "item": "b", "probs": [0.2, 0.3', r"line 3: invalid JSON"),
        (
            '{"query": "q", "probs": [0.2, 0.3, 0.5]}',
            r"line 3: missing field 'item'; fields found: 'query', 'probs'",
        ),
        (
            '{"query": "q", "item": "b", "probs": [0.5, 0.5]}',
            r"line 3, field 'probs': expected 3 probabilities.*got 2",
        ),
        (
            '{"query": "q", "item": "b", "probs": [NaN, 0.5, 0.5]}',
            r"line 3, field 'probs'\[0\]: must be finite",
        ),
        (
            '{"query": "q", "item": "b", "probs": [-0.1, 0.6, 0.5]}',
            r"line 3, field 'probs'\[0\]: must be in \[0, 1\]",
        ),
        (
            '{"query": "q", "item": "b", "probs": [0.2, 0.2, 0.2]}',
            r"line 3, field 'probs': must sum to 1.*got 0\.6",
        ),
        ('{"query": "q", "item": "b", "probs": "0.2 0.3 0.5"}', r"line 3, field 'probs': expected a list"),
        ('{"query": "q", "item": 7, "probs": [0.2, 0.3, 0.5]}', r"line 3, field 'item': expected a string"),
        (
            '{"query": "q", "item": "a", "probs": [0.3, 0.2, 0.5]}',
            r"line 3: duplicate pair .*item='a'.*at line 1",
        ),
    ],
)
def test_malformed_records_name_line_and_field(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        read_teacher_outputs(path)
    assert str(path) in str(info.value)


def test_identical_duplicates_are_accepted_once(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n", encoding="utf-8")
    assert list(read_teacher_outputs(path)) == [("q", "a")]


def test_malformed_parquet_names_the_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    probs = [[0.2, 0.3, 0.5], [0.2, 0.3, 0.6]]
    pq.write_table(pa.table({"query": ["q", "q"], "item": ["a", "b"], "probs": probs}), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1, field 'probs': must sum to 1"):
        read_teacher_outputs(path)
    pq.write_table(pa.table({"query": ["q"], "text": ["a"]}), path)
    with pytest.raises(
        DataError, match=r"missing column\(s\) 'item', 'probs'; columns found: 'query', 'text'"
    ):
        read_teacher_outputs(path)


def test_bad_writes_raise_and_leave_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_teacher_outputs(path, PAIRS, PROBS)
    before = path.read_bytes()
    with pytest.raises(
        InputError, match=r"must be \(len\(pairs\), n_grades\) = \(3, C\), got shape \(2, 3\)"
    ):
        write_teacher_outputs(path, PAIRS, PROBS[:2])
    with pytest.raises(InputError, match="pair 1, field 'probs': must sum to 1"):
        write_teacher_outputs(path, PAIRS, np.array([[0.2, 0.3, 0.5], [0.5, 0.6, 0.0], [1, 0, 0]]))
    with pytest.raises(InputError, match="pair 1 repeats pair 0"):
        write_teacher_outputs(path, [PAIRS[0], PAIRS[0]], PROBS[:2])
    with pytest.raises(InputError, match="JSON-serialisable"):
        write_teacher_outputs(path, PAIRS[:1], PROBS[:1], {"date": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_unsupported_ending(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"supported endings are \.jsonl, \.jsonl\.gz, \.parquet"):
        write_teacher_outputs(tmp_path / "t.csv", PAIRS, PROBS)
    with pytest.raises(DataError, match="no such teacher-output file"):
        read_teacher_outputs(tmp_path / "absent.jsonl")


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"darl-lite\[distill\]"):
        write_teacher_outputs(tmp_path / "t.parquet", PAIRS, PROBS)
    assert list(tmp_path.iterdir()) == []
