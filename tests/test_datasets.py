"""Loaders on the real shipped data, and on small malformed files whose errors must name line and field."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from darl_lite.datasets import (
    DBPEDIA_DIR,
    ID_CLASSES,
    OOD_CLASSES,
    SPLIT_NAMES,
    Splits,
    load_dbpedia,
    load_pairs,
)
from darl_lite.errors import DataError, InputError, MissingExtraError
from darl_lite.types import Pair

N_JUDGMENTS = 49_280


@pytest.fixture(scope="module")
def fold0() -> Splits:
    return load_dbpedia(fold=0)


# ------------------------------------------------------------------------------------- shipped data


def test_fold0_sizes_add_up_and_are_pinned(fold0: Splits) -> None:
    sizes = fold0.sizes
    assert list(sizes) == list(SPLIT_NAMES)
    assert sum(sizes.values()) == N_JUDGMENTS
    assert sum(1 for _ in fold0.all_pairs()) == N_JUDGMENTS
    # Pinned: the split is a pure function of (fold, dev_fraction, seed).
    assert sizes == {
        "train": 19570,
        "dev": 3713,
        "id_test": 5527,
        "ood_train": 13967,
        "ood_dev": 1843,
        "ood_test": 4660,
    }


@pytest.mark.parametrize("fold", range(5))
def test_every_fold_splits_by_query_and_keeps_every_judgment(fold: int) -> None:
    splits = load_dbpedia(fold=fold)
    assert sum(splits.sizes.values()) == N_JUDGMENTS
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for qid in splits.query_ids(name):
            assert qid not in seen, f"query {qid} is in both {seen[qid]} and {name}"
            seen[qid] = name
    assert len(seen) == 467
    assert len(set(splits.all_pairs())) == N_JUDGMENTS  # no pair twice


def test_splits_follow_the_official_fold_files(fold0: Splits) -> None:
    def testing(file: str) -> set[str]:
        return set(json.loads((DBPEDIA_DIR / "folds" / file).read_text())["0"]["testing"])

    id_test = testing("SemSearch-ES.json") | testing("INEX-LD.json") | testing("ListSearch.json")
    assert fold0.query_ids("id_test") == id_test
    assert fold0.query_ids("ood_test") == testing("QALD2.json")
    assert "TREC_Entity-18" in fold0.query_ids("id_test")  # ListSearch ids keep their source prefix


def test_id_and_ood_classes_stay_apart(fold0: Splits) -> None:
    for name in ("train", "dev", "id_test"):
        assert {p.query_class for p in fold0.split(name)} == set(ID_CLASSES)
    for name in ("ood_train", "ood_dev", "ood_test"):
        assert {p.query_class for p in fold0.split(name)} == set(OOD_CLASSES)
    # Row counts per class and grade match the README table.
    counts = Counter((p.query_class, p.grade) for p in fold0.all_pairs())
    assert counts[("SemSearch_ES", 2)] == 345
    assert counts[("QALD2", 0)] == 12311
    assert sum(n for (cls, _), n in counts.items() if cls == "ListSearch") == 11094


def test_pairs_carry_the_entity_title_and_query_fields(fold0: Splits) -> None:
    first = Pair("Szechwan dish food cuisine", "Afghan cuisine", 0, "INEX_LD-2009022", "INEX_LD")
    assert first in set(fold0.all_pairs())


def test_dev_is_a_seeded_fraction_of_training_queries(fold0: Splits) -> None:
    # fold 0 training queries per ID class: 91 + 79 + 92 -> round(0.15 * n) = 14 + 12 + 14 dev queries
    assert len(fold0.query_ids("dev")) == 40
    assert len(fold0.query_ids("ood_dev")) == round(0.15 * 112)
    assert load_dbpedia(fold=0, seed=0) == fold0
    other = load_dbpedia(fold=0, seed=1)
    assert other.query_ids("dev") != fold0.query_ids("dev")
    assert other.query_ids("id_test") == fold0.query_ids("id_test")
    assert load_dbpedia(fold=0, dev_fraction=0.0).sizes["dev"] == 0


def test_query_missing_from_an_upstream_fold_file_goes_to_training() -> None:
    # Upstream INEX-LD fold 1 lists INEX_LD-2012343 on neither side.
    splits = load_dbpedia(fold=1)
    assert "INEX_LD-2012343" in splits.query_ids("train") | splits.query_ids("dev")


def test_load_dbpedia_rejects_bad_arguments() -> None:
    with pytest.raises(InputError, match=r"fold must be an integer in \[0, 5\), got 5"):
        load_dbpedia(fold=5)
    with pytest.raises(InputError, match="dev_fraction"):
        load_dbpedia(dev_fraction=1.0)
    with pytest.raises(InputError, match="unknown split 'test'"):
        load_dbpedia().split("test")


# ------------------------------------------------------------------------------------- load_pairs

GOOD_ROWS = [
    {"query": "jazz", "item": "Miles Davis", "grade": 2, "qid": "q1"},
    {"query": "jazz", "item": "Apple pie", "grade": 0, "qid": "q1"},
]
GOOD_PAIRS = [Pair("jazz", "Miles Davis", 2, "q1"), Pair("jazz", "Apple pie", 0, "q1")]


def _csv_text(rows: list[dict[str, object]]) -> str:
    header = ",".join(rows[0])
    return header + "\n" + "".join(",".join(str(v) for v in row.values()) + "\n" for row in rows)


def test_load_pairs_reads_every_format_alike(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(_csv_text(GOOD_ROWS), encoding="utf-8")
    with gzip.open(tmp_path / "p.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write(_csv_text(GOOD_ROWS))
    jsonl = "".join(json.dumps(row) + "\n" for row in GOOD_ROWS)
    (tmp_path / "p.jsonl").write_text(jsonl, encoding="utf-8")
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(jsonl)
    names = ["p.csv", "p.csv.gz", "p.jsonl", "p.jsonl.gz"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GOOD_ROWS), tmp_path / "p.parquet")
    names.append("p.parquet")
    for name in names:
        assert load_pairs(tmp_path / name, query_id_col="qid") == GOOD_PAIRS, name


def test_load_pairs_unlabeled_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text("query,item\n  spaced query ,x\n", encoding="utf-8")
    # texts are kept exactly as written: they are the keys teacher outputs are matched on
    assert load_pairs(path, grade_col=None) == [Pair("  spaced query ", "x")]
    (tmp_path / "h.csv").write_text("query,item,grade\n", encoding="utf-8")
    assert load_pairs(tmp_path / "h.csv") == []
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    assert load_pairs(tmp_path / "e.jsonl") == []


def test_csv_quoted_newline_reports_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    # line 1 header; record on lines 2-3 (quoted newline); bad record starts on line 4
    path.write_text('query,item,grade\n"two\nlines",x,1\nq,x,7\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.csv, line 4, field 'grade': .*\[0, 3\), got '7'"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("query,item,grade\nq,x,1\nq,x,3\n", r"line 3, field 'grade': grade must be an integer in \[0, 3\)"),
        ("query,item,grade\nq,x,1\nq,x,1.5\n", r"line 3, field 'grade'.*got '1\.5'"),
        ("query,item,grade\nq,x,1\nq,x,\n", r"line 3, field 'grade'.*got missing"),
        ("query,item,grade\nq,x,NaN\n", r"line 2, field 'grade': grade is NaN"),
        ("query,item,grade\n   ,x,1\n", r"line 2, field 'query': value is empty or whitespace"),
        ("query,item,grade\nq,,1\n", r"line 2, field 'item': value is empty"),
        ("query,item,grade\nq,x\n", r"line 2: 2 fields, but the header has 3"),
        ("query,text,grade\nq,x,1\n", r"missing column\(s\) 'item'; columns found: 'query', 'text', 'grade'"),
        ("query,item\nq,x\n", r"missing column\(s\) 'grade' \(pass grade_col=None"),
        ("", r"empty file"),
    ],
)
def test_malformed_csv_names_line_and_field(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        load_pairs(path)
    assert str(path) in str(info.value)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("query,item,grade\nq,x,1\nq,caf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv, line 3: invalid UTF-8"):
        load_pairs(path)
    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"query": "q", "item": "x", "grade": 1}\n{"query": "caf\xe9"}\n'))
    with pytest.raises(DataError, match=r"line 2: invalid UTF-8"):
        load_pairs(gz)


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"query": "q", "item": 3, "grade": 1}', r"line 3, field 'item': expected a string, got int"),
        ('{"query": "q" "item": "x"}', r"line 3: invalid JSON"),
        ('{"query": "q", "grade": 1}', r"line 3: missing field 'item'; fields found: 'query', 'grade'"),
        ('{"query": "q", "item": "x", "grade": NaN}', r"line 3, field 'grade': grade is NaN"),
        ('{"query": "q", "item": "x", "grade": true}', r"line 3, field 'grade'.*got True"),
        ('{"query": "q", "item": "x", "grade": -1}', r"line 3, field 'grade'.*got -1"),
        ('["q", "x", 1]', r"line 3: expected a JSON object, got list"),
    ],
)
def test_malformed_jsonl_names_line_and_field(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    # line 2 is blank: blank lines are skipped but still counted
    path.write_text('{"query": "q", "item": "x", "grade": 1}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_pairs(path)


def test_malformed_parquet_names_row_and_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "item": ["x", "y"], "grade": [1.0, float("nan")]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1, field 'grade': grade is NaN"):
        load_pairs(path)
    pq.write_table(pa.table({"query": ["a", "b"], "item": ["x", " "], "grade": [1, 2]}), path)
    with pytest.raises(DataError, match=r"row 1, field 'item': value is empty"):
        load_pairs(path)
    pq.write_table(pa.table({"query": ["a"], "doc": ["x"]}), path)
    with pytest.raises(DataError, match=r"missing column\(s\) 'item', 'grade'.*found: 'query', 'doc'"):
        load_pairs(path)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"supported endings are \.csv, \.csv\.gz, \.jsonl, \.jsonl\.gz, \.parquet"
    ):
        load_pairs(tmp_path / "pairs.tsv")
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="n_grades"):
        load_pairs(tmp_path / "absent.csv", n_grades=0)


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail, as on a runtime-only install.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"")
    with pytest.raises(MissingExtraError, match=r"darl-lite\[distill\]"):
        load_pairs(path)
