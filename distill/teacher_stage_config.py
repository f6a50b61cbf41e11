"""The settings of ``darl-lite distill teacher-stages`` (one home, read by every stage module)."""

from __future__ import annotations

from dataclasses import dataclass, field

from darl_lite.distill.llm_teacher import ProbeConfig
from darl_lite.distill.top_tune import TopConfig

EVAL_SPLITS = ("dev", "ood_dev", "id_test", "ood_test")
STAGES = ("1", "1+2", "1+2+3")


@dataclass(frozen=True)
class StagesConfig:
    """Everything ``teacher-stages`` varies; ``top.seed`` and ``probe.seed`` are set per seed."""

    seeds: tuple[int, ...] = (0, 1, 2)
    cut: int = 14
    layer: int = 18
    max_length: int = 96
    chunk_size: int = 2048
    cache_batch_size: int = 32
    eval_batch_size: int = 64
    compute_dtype: str = "bfloat16"
    storage_dtype: str = "float16"
    device: str = "cpu"
    alpha_grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    top: TopConfig = field(default_factory=TopConfig)
    #: ``((split, n), ...)``: keep whole queries of a split, seeded, until about ``n`` pairs (a
    #: time-boxed run); a subsampled run writes no teacher file (it must grade every shipped pair).
    max_pairs: tuple[tuple[str, int], ...] = ()
