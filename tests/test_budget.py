"""The sliding-window route budget: exact counts under an injected clock, and thread safety."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest

from darl_lite import InputError, RoutingPolicy, Scorer, SessionConfig
from darl_lite.budget import RouteBudget
from darl_lite.scorer import NOTE_WINDOW_BUDGET


class FakeClock:
    """A clock the test moves by hand (the budget's only source of time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_holds_exactly_over_a_window() -> None:
    clock = FakeClock()
    budget = RouteBudget(0.1, window_s=60.0, clock=clock)
    # 10 pairs, all wanted: floor(0.1 * 10) - 0 = 1.
    assert budget.acquire(10, 10) == 1
    clock.now += 10
    # 5 more: floor(0.1 * 15) - 1 = 0.
    assert budget.acquire(5, 5) == 0
    clock.now += 10
    # 25 more, 2 wanted: floor(0.1 * 40) - 1 = 3 allowed, 2 granted.
    assert budget.acquire(25, 2) == 2
    assert budget.usage() == (40, 3)
    # 30 more, all wanted: floor(0.1 * 70) - 3 = 4.
    assert budget.acquire(30, 30) == 4
    assert budget.usage() == (70, 7)
    # The first call (10 seen, 1 routed) leaves the window at t0 + 60: exactly at the edge.
    clock.now = 1000.0 + 60.0
    assert budget.usage() == (60, 6)
    # floor(0.1 * (60 + 10)) - 6 = 1.
    assert budget.acquire(10, 10) == 1
    # Far later, everything has left the window: a fresh start.
    clock.now += 1000
    assert budget.usage() == (0, 0)
    assert budget.acquire(20, 20) == 2


def test_no_call_pushes_the_window_over_the_fraction() -> None:
    """Recount the window from scratch at every call: the grant is exactly the documented formula,
    and a call that routes anything leaves the window's routed share at or under the fraction."""
    clock = FakeClock()
    budget = RouteBudget(0.25, window_s=5.0, clock=clock)
    events: list[tuple[float, int, int]] = []
    for step in range(300):
        n, wanted = 1 + (step * 7) % 13, (step * 5) % 14
        wanted = min(wanted, n)
        live = [e for e in events if e[0] > clock.now - 5.0]
        seen, routed = sum(e[1] for e in live), sum(e[2] for e in live)
        granted = budget.acquire(n, wanted)
        assert granted == max(0, min(wanted, math.floor(0.25 * (seen + n)) - routed))
        if granted:
            assert routed + granted <= 0.25 * (seen + n)
        events.append((clock.now, n, granted))
        assert budget.usage() == (seen + n, routed + granted)
        clock.now += 0.3 if step % 50 else 7.0
    assert sum(e[2] for e in events) > 50


def test_one_pair_calls_cannot_send_everything() -> None:
    """The per-call cap alone lets a stream of 1-item calls route every pair; the window does not."""
    budget = RouteBudget(0.2, clock=FakeClock())
    assert sum(budget.acquire(1, 1) for _ in range(100)) == 20


def test_threads_never_overspend() -> None:
    budget = RouteBudget(0.1, window_s=3600.0)
    granted: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(500):
            got = budget.acquire(3, 3)
            with lock:
                granted.append(got)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == math.floor(0.1 * 8 * 500 * 3) == budget.usage()[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_fraction": 1.5}, "max_fraction"), ({"max_fraction": 0.1, "window_s": 0}, "window_s")],
)
def test_budget_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        RouteBudget(**kwargs)
    with pytest.raises(InputError, match="wanted"):
        RouteBudget(0.1).acquire(2, 3)


def test_scorer_applies_the_window_budget(tiny_bundle_dir: Path) -> None:
    clock = FakeClock()
    sent: list[int] = []

    def llm(pairs: list[tuple[str, str]]) -> list[list[float]]:
        sent.append(len(pairs))
        return [[0.0, 0.0, 1.0]] * len(pairs)

    scorer = Scorer.load(
        tiny_bundle_dir,
        session=SessionConfig(intra_op_threads=1),
        routing=RoutingPolicy(margin_threshold=1.0),  # every pair a candidate, no per-call cap
        budget=RouteBudget(0.2, window_s=60.0, clock=clock),
        fallback=llm,
    )
    items = [f"item {i}" for i in range(10)]
    first = scorer.score("a query", items)  # window: floor(0.2 * 10) = 2
    assert sum(r.source == "llm" for r in first) == 2
    assert sum(r.note == NOTE_WINDOW_BUDGET and not r.routed for r in first) == 8
    second = scorer.score("a query", items[:1])  # floor(0.2 * 11) - 2 = 0
    assert not second[0].routed and second[0].note == NOTE_WINDOW_BUDGET
    clock.now += 61
    third = scorer.score("a query", items[:5])  # window empty again: floor(0.2 * 5) = 1
    assert sum(r.source == "llm" for r in third) == 1
    assert sent == [2, 1]


def test_whole_lists_come_before_pairs_once_they_have_asked() -> None:
    budget = RouteBudget(0.1, window_s=100.0, clock=lambda: 0.0)
    assert budget.acquire(100, 10) == 10  # no list has asked: pairs get the whole allowance
    assert budget.acquire_list(20) is False  # allowance floor(0.1 * 120) - 10 = 2 < 20: refused
    # the refused list still counts as asked: pairs yield to it, the allowance builds up for lists
    # pairs: min(allowance 32 - 10 routed, 32 - 20 asked by lists - 10 routed as pairs) = 2 of 30
    assert budget.acquire(200, 30) == 2
    assert budget.acquire_list(15) is True  # floor(0.1 * 335) - 12 = 21 >= 15
    assert budget.usage() == (335, 27)
