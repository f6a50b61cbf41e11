"""The runtime on a real (tiny) bundle: results, input validation, routing, fallback, threads."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from darl_lite import InputError, PairScore, RoutingPolicy, Scorer, SessionConfig
from darl_lite.datasets import Splits

ITEMS = ["American Chinese cuisine", "Afghan cuisine", "Mapo doufu", "Kung Pao chicken", "Sichuan pepper"]


@pytest.fixture(scope="module")
def scorer(tiny_bundle_dir: Path) -> Scorer:
    """fp32, so equalities are exact: int8's dynamic activation scales depend on the batch."""
    return Scorer.load(tiny_bundle_dir, precision="fp32", session=SessionConfig(intra_op_threads=1))


def test_score_returns_plain_values_in_input_order(scorer: Scorer) -> None:
    results = scorer.score("Szechwan dish food cuisine", ITEMS)
    assert len(results) == len(ITEMS)
    for r in results:
        assert isinstance(r, PairScore)
        assert all(type(p) is float for p in r.probabilities)
        assert abs(sum(r.probabilities) - 1.0) < 1e-6
        assert type(r.expected_relevance) is float and type(r.ood_score) is float and type(r.grade) is int
        assert r.grade == int(np.argmax(r.probabilities))
        assert r.expected_relevance == pytest.approx(
            sum(p * g for p, g in zip(r.probabilities, (0, 1, 2), strict=True))
        )
    # Scoring items one at a time gives the same probabilities: batching does not matter.
    single = [scorer.score("Szechwan dish food cuisine", [item])[0] for item in ITEMS]
    for a, b in zip(results, single, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)


def test_batch_size_does_not_change_results(tiny_bundle_dir: Path, splits: Splits) -> None:
    """Exact on fp32; int8's dynamic activation scales make it batch-dependent within noise."""
    pairs = splits.id_test[:97]
    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    small = Scorer.load(tiny_bundle_dir, precision="fp32", batch_size=4).score_arrays(queries, items)
    large = Scorer.load(tiny_bundle_dir, precision="fp32", batch_size=64).score_arrays(queries, items)
    np.testing.assert_allclose(small.student_probabilities, large.student_probabilities, atol=1e-5)
    np.testing.assert_allclose(small.ood_scores, large.ood_scores, rtol=1e-4, atol=1e-3)


def test_score_many_matches_score(scorer: Scorer) -> None:
    many = scorer.score_many([("Szechwan dish food cuisine", ITEMS[:3]), ("films by Kurosawa", ITEMS[3:])])
    assert [len(x) for x in many] == [3, 2]
    alone = scorer.score("Szechwan dish food cuisine", ITEMS[:3])
    for a, b in zip(many[0], alone, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        assert a.ood_score == pytest.approx(b.ood_score, rel=1e-4)


def test_empty_item_list_returns_empty(scorer: Scorer) -> None:
    assert scorer.score("anything", []) == []
    assert scorer.score_many([]) == []


@pytest.mark.parametrize(
    ("query", "items", "message"),
    [
        ("", ["x"], "query is empty"),
        ("   ", ["x"], "query is empty"),
        (None, ["x"], "query must be a string, got NoneType"),
        ("q", "a single string", "items must be a list of strings, got a single str"),
        ("q", ["ok", 3], r"items\[1\] must be a string, got int"),
        ("q", ["ok", " "], r"items\[1\] is empty"),
        ("q", None, "items must be a list of strings, got NoneType"),
    ],
)
def test_bad_input_names_the_problem(scorer: Scorer, query: object, items: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        scorer.score(query, items)  # type: ignore[arg-type]


def test_caller_inputs_are_not_mutated(scorer: Scorer) -> None:
    items = list(ITEMS)
    scorer.score("Szechwan dish food cuisine", items)
    assert items == ITEMS


def test_long_text_is_truncated_and_reported(scorer: Scorer) -> None:
    long_item = "cuisine " * 200_000  # 1.6 MB
    short, long = scorer.score("Szechwan dish food cuisine", ["Mapo doufu", long_item])
    assert not short.truncated
    assert long.truncated


def test_routing_sends_pairs_to_the_fallback(tiny_bundle_dir: Path) -> None:
    seen: list[tuple[str, str]] = []

    def llm(pairs: list[tuple[str, str]]) -> list[list[float]]:
        seen.extend(pairs)
        return [[0.0, 0.0, 1.0]] * len(pairs)

    # Route everything (margin threshold 1 makes every pair uncertain), no budget limit.
    scorer = Scorer.load(tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0), fallback=llm)
    results = scorer.score("Szechwan dish food cuisine", ITEMS)
    assert all(r.routed and r.source == "llm" and r.grade == 2 for r in results)
    assert seen == [("Szechwan dish food cuisine", item) for item in ITEMS]


def test_budget_caps_the_routed_share(tiny_bundle_dir: Path) -> None:
    calls: list[int] = []

    def llm(pairs: list[tuple[str, str]]) -> np.ndarray:
        calls.append(len(pairs))
        return np.full((len(pairs), 3), 1 / 3)

    policy = RoutingPolicy(margin_threshold=1.0, max_route_fraction=0.2)
    scorer = Scorer.load(tiny_bundle_dir, routing=policy, fallback=llm)
    items = [f"item number {i}" for i in range(50)]
    results = scorer.score("some query", items)
    assert calls == [10]
    assert sum(r.source == "llm" for r in results) == 10
    kept = [r for r in results if not r.routed]
    assert len(kept) == 40 and all("budget" in r.note for r in kept)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("raise", "ConnectionError"),
        ("short", "shape"),
        ("nan", "not probability distributions"),
        ("garbage", "ValueError"),
    ],
)
def test_failing_fallback_keeps_student_answers(tiny_bundle_dir: Path, behaviour: str, reason: str) -> None:
    def llm(pairs: list[tuple[str, str]]) -> object:
        if behaviour == "raise":
            raise ConnectionError("LLM endpoint down")
        if behaviour == "short":
            return [[1.0, 0.0, 0.0]]
        if behaviour == "nan":
            return [[float("nan"), 0.5, 0.5]] * len(pairs)
        return [["strong", "weak", "none"]] * len(pairs)

    plain = Scorer.load(tiny_bundle_dir).score("Szechwan dish food cuisine", ITEMS)
    scorer = Scorer.load(tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0), fallback=llm)  # type: ignore[arg-type]
    results = scorer.score("Szechwan dish food cuisine", ITEMS)
    for got, student in zip(results, plain, strict=True):
        assert got.source == "student" and got.routed
        assert reason in got.note
        assert got.probabilities == student.probabilities


def test_no_fallback_flags_routed_pairs(tiny_bundle_dir: Path) -> None:
    scorer = Scorer.load(tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0))
    results = scorer.score("q", ["a", "b"])
    assert all(r.routed and r.source == "student" and "no fallback" in r.note for r in results)


def test_threads_get_the_same_answers(scorer: Scorer, splits: Splits) -> None:
    pairs = splits.ood_test[:64]
    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    expected = scorer.score_arrays(queries, items).student_probabilities
    outputs: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                outputs.append(scorer.score_arrays(queries, items).student_probabilities)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(outputs) == 12
    for out in outputs:
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_fp32_and_int8_agree_on_the_tiny_bundle(tiny_bundle_dir: Path, splits: Splits) -> None:
    pairs = splits.id_test[:200]
    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    int8 = Scorer.load(tiny_bundle_dir, precision="int8").score_arrays(queries, items)
    fp32 = Scorer.load(tiny_bundle_dir, precision="fp32").score_arrays(queries, items)
    assert np.mean(int8.logits.argmax(1) == fp32.logits.argmax(1)) >= 0.95


def test_ood_scores_are_higher_out_of_distribution(scorer: Scorer, splits: Splits) -> None:
    """Even the tiny model's detector ranks natural-language questions above keyword queries."""
    from darl_lite.metrics import auroc

    idp, oodp = splits.id_test[:400], splits.ood_test[:400]
    id_scores = scorer.score_arrays([p.query for p in idp], [p.item for p in idp]).ood_scores
    ood_scores = scorer.score_arrays([p.query for p in oodp], [p.item for p in oodp]).ood_scores
    assert auroc(id_scores, ood_scores) > 0.5


def test_async_calls_match_sync_calls(scorer: Scorer, splits: Splits) -> None:
    """Many concurrent ascore / ascore_many calls on one event loop give the sync answers."""
    pairs = splits.ood_test[:120]
    requests = [(pairs[k].query, [p.item for p in pairs[k : k + 10]]) for k in range(0, 120, 10)]
    expected = [scorer.score(q, items) for q, items in requests]

    async def main() -> tuple[list[list[PairScore]], list[list[list[PairScore]]]]:
        singles = asyncio.gather(*(scorer.ascore(q, items) for q, items in requests))
        batches = asyncio.gather(*(scorer.ascore_many(requests) for _ in range(3)))
        return await singles, await batches

    singles, batches = asyncio.run(main())
    for got in (singles, *batches):
        for a_list, b_list in zip(got, expected, strict=True):
            for a, b in zip(a_list, b_list, strict=True):
                np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    with pytest.raises(InputError, match="query is empty"):
        asyncio.run(scorer.ascore(" ", ["x"]))


def test_importing_the_runtime_never_imports_torch() -> None:
    code = (
        "import sys, darl_lite, darl_lite.scorer, darl_lite.cli, darl_lite.pipeline.quickstart\n"
        "import darl_lite.metrics, darl_lite.serve, darl_lite.budget, darl_lite.route_curve\n"
        "import darl_lite.shift, darl_lite.cascade, darl_lite.cascade_fit, darl_lite.mixed_stream\n"
        "import darl_lite.refit, darl_lite.shift_routing\n"
        "heavy = ('torch', 'transformers', 'optimum', 'onnx', 'fastapi', 'uvicorn', 'httpx', 'starlette')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_lone_pair_is_fed_as_the_tokenizer_encodes_it_and_padding_keeps_its_answer(scorer: Scorer) -> None:
    """A lone pair's feeds are the tokenizer's own pair encoding; padded beside a longer pair, same answer."""
    model = scorer.model
    query, short = "szechwan cuisine", "Mapo tofu"
    long_ = "Afghan cuisine of the mountain provinces in winter"
    alone = model.plan([query], [short])
    ((_index, feeds),) = alone.batches
    expected = model.tokenizer.encode(query, short)
    assert feeds["input_ids"].tolist() == [expected.ids]
    assert feeds["attention_mask"].tolist() == [[1] * len(expected.ids)]
    if "token_type_ids" in feeds:
        assert feeds["token_type_ids"].tolist() == [expected.type_ids]
    assert all(f.dtype == np.int64 for f in feeds.values())
    padded = model.run([query, query], [short, long_])  # one batch, the short pair padded
    np.testing.assert_allclose(model.run([query], [short]).logits[0], padded.logits[0], atol=1e-5)
