"""Plot the LLM teacher's probe ablation over seeds: test metrics per arm, mean ± standard deviation.

    python -m bench.plot_teacher_ablation teacher-run teacher-seed1 teacher-seed2 \\
        --out docs/img/teacher_probe_ablation.png

Each argument is an output folder of ``darl-lite distill teacher`` (one seed each).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS = (("macro_f1", "macro-F1"), ("ndcg@10", "NDCG@10"), ("ece", "ECE (lower is better)"))
SPLITS = ("id_test", "ood_test")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.plot_teacher_ablation", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="distill teacher output folders")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads((run / "teacher_probe_ablation.json").read_text()) for run in args.runs]
    arms = list(runs[0])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.8))
    width = 0.38
    x = np.arange(len(arms))
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        for k, split in enumerate(SPLITS):
            values = np.array([[run[arm]["metrics"][split][key] for arm in arms] for run in runs])
            ax.bar(
                x + (k - 0.5) * width,
                values.mean(axis=0),
                width,
                yerr=values.std(axis=0, ddof=1) if len(runs) > 1 else None,
                capsize=3,
                label=split,
            )
        ax.set_xticks(x, arms, rotation=20)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"LLM teacher probe ablation (Qwen2.5-Coder-0.5B, {len(runs)} seeds, mean ± sd)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
