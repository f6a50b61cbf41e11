"""Real-model runs, out of the default suite: `pytest -m slow`.

The quickstart on the real MiniLM backbone with a subsample of the shipped training pairs, and the
runtime installed from a built wheel into a fresh virtual environment without extras.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_on_real_minilm(tmp_path: Path) -> None:
    from darl_lite.pipeline.quickstart import QuickstartConfig, run_quickstart

    report = run_quickstart(QuickstartConfig(out_dir=str(tmp_path), max_train_pairs=2000, progress=False))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["teacher"]["kind"] == "llm"
    for model in ("teacher", "student_fp32", "student_int8", "cascade"):
        for split in ("id_test", "ood_test"):
            assert set(saved["metrics"][model][split]) >= {"macro_f1", "accuracy", "ndcg@10", "ece"}
    assert saved["splits"]["train"] == 2000
    assert 0.5 < report["ood_detection"]["auroc"] <= 1.0
    assert report["parity"]["argmax_agreement"] >= 0.95
    assert (tmp_path / "summary.md").read_text().startswith("# darl-lite quickstart")
    # distribution-aware routing: the query-level detector, its decisions, the mixed-traffic table
    assert saved["shift_detection"]["query_auroc_domain"] >= 0.9
    assert saved["routing"]["shift"][0]["name"] == "ood_train pool"
    shares = {row["share"] for row in saved["routing"]["mixed"]}
    assert shares == {0.0, 0.1, 0.3, 1.0}
    assert "Mixed traffic" in (tmp_path / "summary.md").read_text()


def test_wheel_without_extras_scores_without_torch(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    wheel = next(wheels.glob("darl_lite-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True)
    code = (
        "import sys, darl_lite\n"
        f"s = darl_lite.Scorer.load({str(tiny_bundle_dir)!r})\n"
        "r = s.score('Szechwan dish food cuisine', ['Mapo doufu', 'Afghan cuisine'])\n"
        "assert len(r) == 2 and abs(sum(r[0].probabilities) - 1) < 1e-6\n"
        "from darl_lite.datasets import load_dbpedia\n"
        "assert sum(load_dbpedia().sizes.values()) == 49280\n"
        "assert 'torch' not in sys.modules\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('torch') is None, 'torch was installed'\n"
        "print('ok')\n"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok"
