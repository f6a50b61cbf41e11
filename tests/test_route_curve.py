"""The route curve on hand-made data, and the route-curve command on the tiny bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from darl_lite import RoutingPolicy
from darl_lite.cli import main
from darl_lite.route_curve import route_curve
from darl_lite.routing import error_threshold_for_rate


def test_router_that_knows_the_errors_beats_random() -> None:
    rng = np.random.default_rng(0)
    n = 400
    grades = rng.integers(0, 3, n)
    teacher = np.eye(3)[grades] * 0.9 + 0.1 / 3  # right everywhere
    student = teacher.copy()
    wrong = rng.random(n) < 0.3
    student[wrong] = np.eye(3)[(grades[wrong] + 1) % 3] * 0.5 + 0.5 / 3  # wrong and unsure
    urgency = RoutingPolicy(rule="expected_error").urgency(student, np.zeros(n))
    rows = route_curve(student, teacher, urgency, grades, [str(i // 20) for i in range(n)], rates=(0.0, 0.2))
    assert rows[0]["router"] == rows[0]["random"]
    assert rows[1]["router"]["macro_f1"] > rows[1]["random"]["macro_f1"]
    # The 80 routed pairs are all wrong ones (they are the only unsure ones): each is fixed.
    assert rows[1]["router"]["accuracy"] == pytest.approx(1 - (wrong.sum() - 80) / n)


def test_error_threshold_for_rate_hits_the_rate() -> None:
    probs = np.random.default_rng(1).dirichlet(np.ones(3), 1000)
    policy = RoutingPolicy(rule="expected_error", error_threshold=error_threshold_for_rate(probs, 0.1))
    assert policy.decide(probs, np.zeros(1000)).candidate.mean() == pytest.approx(0.1, abs=0.002)


def test_route_curve_command(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["route-curve", str(tiny_bundle_dir), "--split", "ood_dev", "--rates", "0,0.1", "--repeats", "2"]
    assert main([*args, "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "teacher alone" in out[0] and "expected_error" in out[0]
    assert out[1].split()[:3] == ["route", "rate", "router"]
    assert len(out) == 4 and out[2].split()[0] == "0.0%"


def test_route_curve_rejects_bad_rates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["route-curve", "x", "--rates", "0,1.5"])
    assert "--rates" in capsys.readouterr().err
