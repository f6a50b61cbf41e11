"""The one-home helpers: atomic writes (darl_lite.atomic), the line reader (darl_lite.lines),
softmax (darl_lite.calibration) and head pooling (darl_lite.export.heads)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from darl_lite.atomic import atomic_path, atomic_write_json, atomic_write_text, replace_dir, staging_dir
from darl_lite.calibration import softmax
from darl_lite.errors import DataError
from darl_lite.lines import jsonl_objects


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == [
        "f.json"
    ]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_staging_dir_is_removed_on_failure_and_replace_dir_swaps(tmp_path: Path) -> None:
    with pytest.raises(OSError), staging_dir(tmp_path, prefix=".s-") as staging:
        (staging / "x").write_text("1")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "out"
    for text in ("old", "new"):
        with staging_dir(tmp_path, prefix=".s-") as staging:
            (staging / "v").write_text(text)
            replace_dir(staging, target)
    assert (target / "v").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_jsonl_objects_reads_gzip_and_a_bom_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as handle:
        handle.write('\ufeff{"q": "é"}\n\n{"q": "漢"}\n')
    assert [(w.rsplit(", ", 1)[1], r) for w, r in jsonl_objects(good)] == [
        ("line 1", {"q": "é"}),
        ("line 3", {"q": "漢"}),
    ]
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"q": 1}\n{"q": "\xff"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl, line 2: invalid UTF-8"):
        list(jsonl_objects(bad))
    bad.write_bytes(b'{"q": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        list(jsonl_objects(bad))


def test_softmax_is_stable_and_tempered() -> None:
    logits = np.array([[1000.0, 1000.0, 0.0], [0.0, np.log(2.0), np.log(3.0)]])
    np.testing.assert_allclose(softmax(logits)[0], [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(softmax(logits)[1], [1 / 6, 2 / 6, 3 / 6], rtol=1e-12)
    np.testing.assert_allclose(softmax(logits * 2.0, temperature=2.0), softmax(logits), rtol=1e-12)


def test_pooling_picks_the_last_non_pad_token_and_refuses_pooling_heads() -> None:
    import torch

    from darl_lite.errors import InputError
    from darl_lite.export.heads import pool_head_input

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]])
    pooled = pool_head_input(hidden, ids, "score", pad_token_id=0)
    assert torch.equal(pooled, torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool_head_input(hidden, ids, "score", None), hidden[:, -1])
    assert pool_head_input(hidden[:, 0], ids, "classifier", 0) is not None
    with pytest.raises(InputError, match="pools inside itself"):
        pool_head_input(hidden, ids, "classifier", 0)
