"""The ablation command end to end on the shipped data, with a tiny student built from a config.

Every arm runs (a handful of steps each), so the command a later session runs at full size is known
to work: data, teacher file, pool, labeler, the three stages, test metrics, the report files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from darl_lite.distill.ablation import ARMS, _subsample_queries, main  # noqa: E402
from darl_lite.types import Pair  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer (untrained), saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from darl_lite.distill.backbone import minilm_path
    from darl_lite.distill.trainer import save_student

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return save_student(BertForSequenceClassification(config), tokenizer, tmp_path_factory.mktemp("tiny"))


def test_subsample_keeps_whole_queries():
    pairs = [Pair("q", str(i), 0, query_id=f"q{i % 7}") for i in range(70)]
    picked = _subsample_queries(pairs, 25, seed=0)
    ids = {p.query_id for p in picked}
    assert 20 <= len(picked) <= 25 and len(picked) == 10 * len(ids)
    assert _subsample_queries(pairs, None, seed=0) == pairs


def test_every_arm_runs_and_the_report_compares_them(tiny_backbone: Path, tmp_path: Path):
    out = tmp_path / "run"
    report = main(
        [
            "--out",
            str(out),
            "--backbone",
            str(tiny_backbone),
            "--smoke",
            "--max-train-pairs",
            "48",
            "--max-dev-pairs",
            "30",
            "--max-test-pairs",
            "30",
            "--max-pool-pairs",
            "120",
            "--augment-budget",
            "8",
            "--alpha-grid",
            "0",
            "1",
            "--max-length",
            "24",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
        ]
    )
    assert set(report["arms"]) == set(ARMS)
    steps = {arm["summary"]["steps"]["finetune"] for arm in report["arms"].values()}
    assert steps == {report["finetune_steps_per_arm"]} == {4}  # ceil((48 + 8) / 16): equal budget
    for name, arm in report["arms"].items():
        assert set(arm["test"]) == {"id_test", "ood_test"}
        assert set(arm["summary"]["metrics"]) == (
            {"finetune"} if name.endswith("single") else {"probe", "finetune", "interpolate"}
        )
    assert report["arms"]["graded-multi-dasa"]["summary"]["augmentation"] == {"method": "dasa", "size": 8}
    assert report["arms"]["graded-multi-random"]["summary"]["augmentation"] == {"method": "random", "size": 8}
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["sizes"]["augment_budget"] == 8
    table = (out / "ablation.md").read_text()
    assert "DASA vs random (equal size)" in table and "graded loss vs plain CE" in table
