"""``darl-lite distill teacher``: cache the LLM's features, tune its probe, grade every pair, write it all.

One command, resumable where it is expensive (the feature pass, chunk by chunk), cheap after:

1. last-token hidden states of every distinct shipped pair at the candidate layers
   (:func:`darl_lite.distill.llm_features.cache_features`);
2. the probe ablation and the tuned probe (:mod:`darl_lite.distill.llm_teacher`);
3. grade probabilities of every pair from the tuned probe → a teacher file whose provenance names
   the model hash, recipe, layer, metrics, compute and command; the head itself as ``.npz``.

:class:`ProbeTeacher` grades new pairs with the same LLM and head (``darl-lite distill label
--head``), so the teacher that labels a user's data is the one shipped here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from darl_lite.datasets import Splits
from darl_lite.distill.backbone import local_model_dir, pad_token_id_of, weights_sha256
from darl_lite.distill.llm_features import TEACHER_TEMPLATE, cache_features, compute_states, distinct_pairs
from darl_lite.distill.llm_teacher import (
    FeatureTable,
    ProbeConfig,
    ProbeHead,
    ablation_markdown,
    probe_ablation,
    summary,
    tune_probe,
)
from darl_lite.distill.teacher_provenance import run_record, teacher_identity
from darl_lite.distill.teachers import HFTeacher
from darl_lite.errors import InputError
from darl_lite.teacher_file import write_teacher_outputs
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: Candidate layers of the probe (``hidden_states`` indices; -1 is the final-norm output).
DEFAULT_LAYERS: tuple[int, ...] = (12, 18, -1)
TEACHER_NAME = "Qwen2.5-Coder-0.5B-Instruct + DaRL linear probe (graded loss, DASA)"


def load_llm(model_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The LLM (fp32, eval, pad id resolved as for any LLM teacher) and its tokenizer; its head is unused."""
    teacher = HFTeacher.from_pretrained(model_dir, kind="llm", dtype=torch.float32)
    return teacher.model, teacher.tokenizer


class ProbeTeacher:
    """The tuned teacher: the LLM's last-token state at the head's layer, through the probe head.

    Implements :class:`darl_lite.teacher.Teacher` (``kind = "llm"``).
    """

    kind = "llm"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        head: ProbeHead,
        *,
        name: str = TEACHER_NAME,
        template: str = TEACHER_TEMPLATE,
        max_length: int = 96,
        batch_size: int = 32,
    ) -> None:
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.name, self.template = name, template
        self.max_length, self.batch_size = max_length, batch_size
        n_states = int(model.config.num_hidden_layers) + 1
        if not -n_states <= head.layer < n_states:
            raise InputError(
                f"the head reads layer {head.layer}; this model has {n_states} hidden states. Load the "
                "LLM the head was trained on (its sha256 is in the teacher file's provenance)"
            )
        self._layer = head.layer % n_states

    @classmethod
    def from_files(
        cls, model_dir: str | os.PathLike[str], head_path: str | os.PathLike[str], **kwargs: Any
    ) -> ProbeTeacher:
        model, tokenizer = load_llm(model_dir)
        return cls(model, tokenizer, ProbeHead.load(head_path), **kwargs)

    def predict_proba(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        if not pairs:
            return np.zeros((0, self.head.weight.shape[0]), np.float32)
        bar = tqdm(total=len(pairs), desc="LLM teacher", unit="pair", disable=len(pairs) < 512)
        try:
            states = compute_states(
                self.model,
                self.tokenizer,
                pairs,
                (self._layer,),
                self.template,
                self.max_length,
                self.batch_size,
                pad_token_id_of(self.model, self.tokenizer),
                bar,
            )
        finally:
            bar.close()
        return self.head.predict_proba(states[self._layer])


@dataclass(frozen=True)
class TeacherRun:
    """What ``distill teacher`` wrote."""

    teacher_file: Path
    head_file: Path
    ablation_file: Path
    provenance: dict[str, Any]


def _feature_seconds(cache_dir: Path) -> float:
    """Wall time of the feature pass, from the cache's file times (meta first, last chunk last)."""
    chunks = sorted(cache_dir.glob("chunk-*.npz"))
    if not chunks:
        return 0.0
    return round(max(c.stat().st_mtime for c in chunks) - (cache_dir / "meta.json").stat().st_mtime, 1)


def tune_teacher(
    splits: Splits,
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str],
    config: ProbeConfig | None = None,
    layers: Sequence[int] = DEFAULT_LAYERS,
    max_length: int = 96,
    batch_size: int = 32,
    teacher_file_name: str = "teacher_llm.jsonl.gz",
    head_file_name: str = "teacher_llm_head.npz",
    fold: int = 0,
    progress: bool = True,
) -> TeacherRun:
    """Features → probe ablation → tuned probe → teacher file + head + ablation report in ``out_dir``."""
    started = time.perf_counter()
    config = config or ProbeConfig()
    folder = local_model_dir(model_dir, "teacher LLM")
    model_sha = weights_sha256(folder)
    pairs = distinct_pairs(splits)
    model, tokenizer = load_llm(folder)
    cache = Path(cache_dir)
    features = cache_features(
        model,
        tokenizer,
        pairs,
        cache,
        model_sha256=model_sha,
        layers=layers,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
    )
    del model  # the probe needs only the features
    table = FeatureTable.build(features, pairs)
    arms = probe_ablation(table, splits, config)
    # The configured arm is one of the ablation's; its probe is the teacher.
    tuned = next((t for t in arms.values() if t.config == config), None) or tune_probe(table, splits, config)
    head = tuned.head
    probs = head.predict_proba(features[head.layer])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_file = out / head_file_name
    head.save(head_file)
    ablation = {arm: summary(t) for arm, t in arms.items()}
    ablation_file = out / "teacher_probe_ablation.json"
    ablation_file.write_text(json.dumps(ablation, indent=2) + "\n", encoding="utf-8")
    (out / "teacher_probe_ablation.md").write_text(ablation_markdown(arms), encoding="utf-8")
    provenance = _provenance(
        head_file, tuned, config, layers, max_length, model_sha, len(pairs), cache, started, fold
    )
    teacher_file = write_teacher_outputs(out / teacher_file_name, pairs, probs, provenance)
    return TeacherRun(teacher_file, head_file, ablation_file, provenance)


def _provenance(
    head_file: Path,
    tuned: Any,
    config: ProbeConfig,
    layers: Sequence[int],
    max_length: int,
    model_sha: str,
    n_pairs: int,
    cache: Path,
    started: float,
    fold: int,
) -> dict[str, Any]:
    """The teacher file's provenance: model and head hashes, recipe, data, compute, command, date."""
    return {
        **teacher_identity(TEACHER_NAME, model_sha, head_file),
        "recipe": {
            "stage": "1 of 3 (linear probe on frozen last-token states); stages 2-3 need a GPU",
            "template": TEACHER_TEMPLATE,
            "max_length": max_length,
            "candidate_layers": list(layers),
            **summary(tuned),
        },
        "trained_on": {
            "splits": ["train", f"{tuned.augmented} ood_train pairs chosen by {config.augmentation}"],
            "fold": fold,
            "selection": "layer and temperature on dev + ood_dev",
        },
        "labelled_pairs": n_pairs,
        "compute": {
            "feature_pass_seconds": _feature_seconds(cache),
            "probe_and_ablation_seconds": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),
            "dtype": "float32",
        },
        **run_record(),
    }
