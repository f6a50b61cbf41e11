"""Shared fixtures: a tiny student built from a config, trained a few steps on shipped pairs, and
exported to a real bundle once per session (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from darl_lite.bundle import Bundle
from darl_lite.datasets import Splits, load_dbpedia
from darl_lite.types import Pair


def pytest_sessionstart(session: pytest.Session) -> None:
    """A package of darl-lite[all] missing fails the run here instead of skipping its tests."""
    from install_check import check_install

    if (problem := check_install()) is not None:
        pytest.exit(problem, returncode=1)


@pytest.fixture(scope="session")
def splits() -> Splits:
    return load_dbpedia(fold=0)


def _sample(pairs: tuple[Pair, ...], n: int, seed: int = 0) -> list[Pair]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))]


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, splits: Splits) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer, trained 30 steps on human grades."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from darl_lite.distill.backbone import minilm_path
    from darl_lite.distill.trainer import DistillConfig, distill_student, save_student

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    train = _sample(splits.train, 960)
    one_hot = np.eye(3, dtype=np.float32)[np.asarray([p.grade for p in train], dtype=np.int64)]
    distill_student(
        model,
        tokenizer,
        train,
        one_hot,
        DistillConfig(epochs=1, batch_size=32, lr=3e-3, alpha=0.0, max_length=32),
        progress=False,
    )
    return save_student(model, tokenizer, tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_student_dir: Path, tmp_path_factory: pytest.TempPathFactory, splits: Splits) -> Path:
    """A real bundle exported from the tiny student (parity gate relaxed: the model is tiny)."""
    from darl_lite.export.build import ExportConfig, build_bundle
    from darl_lite.export.parity import ParityThresholds

    bundle: Bundle = build_bundle(
        tiny_student_dir,
        tmp_path_factory.mktemp("bundles") / "tiny",
        train_pairs=_sample(splits.train, 400, seed=1),
        dev_pairs=_sample(splits.dev, 300, seed=2),
        parity_pairs=_sample(splits.dev, 200, seed=3),
        teacher={"name": "human grades", "kind": "test"},
        config=ExportConfig(
            max_length=32,
            thresholds=ParityThresholds(min_argmax_agreement=0.5, min_spearman=0.5, min_ndcg_retention=0.5),
        ),
    )
    return bundle.directory


@pytest.fixture()
def bundle_copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, target)
    return target
