"""The OpenAI-compatible client against a real tiny causal LM served over loopback.

A 2-layer, 32-wide Qwen2 with a word-level tokenizer (grade tokens "0", "1", "2" are single tokens)
is built from a config once per module, served by ``darl_lite.distill.openai_server`` on 127.0.0.1,
and graded three ways that must agree: in process (LocalLLMGrader), over HTTP (OpenAIGradeClient),
and through the runtime's Scorer with the client as its fallback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darl_lite import RoutingPolicy, Scorer, Teacher
from darl_lite.errors import InputError
from darl_lite.llm import CircuitBreaker, FallbackError, OpenAIGradeClient, PromptTemplate, teacher_fallback

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from darl_lite.distill.local_llm import LocalLLMGrader  # noqa: E402
from darl_lite.distill.openai_server import serve_in_thread  # noqa: E402

WORDS = [
    *[
        "judge",
        "how",
        "relevant",
        "the",
        "item",
        "is",
        "to",
        "search",
        "query",
        "answer",
        "with",
        "one",
        "digit",
        "irrelevant",
        "partially",
    ],
    *[
        "highly",
        "grade",
        "szechwan",
        "cuisine",
        "mapo",
        "doufu",
        "afghan",
        "kung",
        "pao",
        "chicken",
        "sichuan",
        "pepper",
        "food",
        "of",
    ],
    *["china", "dumplings", "river", "city", "music", "band", "rock", "jazz", "history", "war"],
]
VOCAB = ["[PAD]", "[UNK]", "[EOS]", *[str(d) for d in range(10)], ":", "=", ",", ".", *WORDS]
QUERY = "szechwan cuisine"
ITEMS = ["Mapo doufu", "Afghan cuisine", "Kung Pao chicken, Sichuan pepper", "a rock band"]
PAIRS = [(QUERY, item) for item in ITEMS]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    """A random 2-layer Qwen2 causal LM; a wide initialiser so grade distributions differ by pair."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval(), _tokenizer()


@pytest.fixture(scope="module")
def grader(tiny_lm: tuple[Any, Any]) -> LocalLLMGrader:
    return LocalLLMGrader(*tiny_lm, batch_size=4)


@pytest.fixture(scope="module")
def server_url(tiny_lm: tuple[Any, Any]) -> Iterator[str]:
    url, stop = serve_in_thread(*tiny_lm, model_name="tiny", max_logprobs=len(VOCAB))
    yield url
    stop()


def _client(url: str, **options: Any) -> OpenAIGradeClient:
    defaults: dict[str, Any] = {"top_logprobs": len(VOCAB), "timeout_s": 5.0}
    return OpenAIGradeClient(url, "tiny", **{**defaults, **options})


# ------------------------------------------------------------------------------------------------
def test_local_grader_gives_distributions_that_do_not_depend_on_batch_size(
    tiny_lm: tuple[Any, Any], grader: LocalLLMGrader
) -> None:
    probs = grader(PAIRS)
    assert probs.shape == (len(PAIRS), 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert np.ptp(probs[:, 0]) > 1e-3, "the tiny model should not grade every pair alike"
    one_by_one = LocalLLMGrader(*tiny_lm, batch_size=1)(PAIRS)  # no padding at all
    np.testing.assert_allclose(probs, one_by_one, atol=1e-6)
    assert grader([]).shape == (0, 3)
    as_teacher: Teacher = grader  # the protocol, checked by mypy here and at run time below
    assert isinstance(as_teacher, Teacher)
    assert grader.predict_proba(PAIRS).dtype == np.float32


def test_local_grader_matches_a_hand_computed_softmax(
    tiny_lm: tuple[Any, Any], grader: LocalLLMGrader
) -> None:
    model, tokenizer = tiny_lm
    prompt = grader.prompt.render(*PAIRS[0])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    grade_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("0", "1", "2")]
    expected = torch.softmax(logits[grade_ids], dim=0).numpy()
    np.testing.assert_allclose(grader(PAIRS[:1])[0], expected, atol=1e-6)


def test_local_grader_refuses_grade_tokens_that_are_not_single_tokens(tiny_lm: tuple[Any, Any]) -> None:
    with pytest.raises(InputError, match="'strongly' is not a single token"):
        LocalLLMGrader(*tiny_lm, grade_tokens=("0", "1", "strongly"))
    with pytest.raises(InputError, match="differ after stripping"):
        LocalLLMGrader(*tiny_lm, grade_tokens=("1", " 1", "2"))
    with pytest.raises(InputError, match="must contain both"):
        LocalLLMGrader(*tiny_lm, prompt_template="Query: {query}")


def test_client_over_http_equals_the_in_process_grader(server_url: str, grader: LocalLLMGrader) -> None:
    with _client(server_url) as client:
        probs = client(PAIRS)
        assert client([]).shape == (0, 3)
    np.testing.assert_allclose(probs, grader(PAIRS), atol=1e-5)


def test_base_url_with_v1_suffix_and_word_grade_tokens(tiny_lm: tuple[Any, Any], server_url: str) -> None:
    """Grades may be named by any single tokens; a ``/v1`` base URL (as OpenAI SDKs write it) works."""
    tokens = ("irrelevant", "partially", "highly")
    local = LocalLLMGrader(*tiny_lm, grade_tokens=tokens)
    with _client(server_url + "/v1/", grade_tokens=tokens) as client:
        np.testing.assert_allclose(client(PAIRS), local(PAIRS), atol=1e-5)


def test_scorer_routes_pairs_to_the_served_llm(
    tiny_bundle_dir: Path, server_url: str, grader: LocalLLMGrader
) -> None:
    with _client(server_url) as client:
        scorer = Scorer.load(tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0), fallback=client)
        results = scorer.score(QUERY, ITEMS)
    assert [r.source for r in results] == ["llm"] * len(ITEMS)
    assert all(r.routed and r.note == "" for r in results)
    np.testing.assert_allclose([r.probabilities for r in results], grader(PAIRS), atol=1e-5)


def test_a_teacher_with_a_classification_head_plugs_in_as_a_fallback(
    tiny_bundle_dir: Path, tiny_lm: tuple[Any, Any]
) -> None:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from darl_lite.distill.teachers import HFTeacher

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    teacher = HFTeacher(
        Qwen2ForSequenceClassification(config),
        tiny_lm[1],
        name="tiny-head",
        kind="llm",
        template=PromptTemplate().template,
    )
    scorer = Scorer.load(
        tiny_bundle_dir, routing=RoutingPolicy(margin_threshold=1.0), fallback=teacher_fallback(teacher)
    )
    results = scorer.score(QUERY, ITEMS)
    assert [r.source for r in results] == ["llm"] * len(ITEMS)
    from darl_lite.types import Pair

    expected = teacher.predict_proba([Pair(q, i) for q, i in PAIRS])
    np.testing.assert_allclose([r.probabilities for r in results], expected, atol=1e-5)


def test_server_speaks_the_completions_protocol(server_url: str) -> None:
    with httpx.Client(base_url=server_url, timeout=5.0) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": "the grade:", "max_tokens": 3, "logprobs": 5, "temperature": 0}
        answer = http.post("/v1/completions", json=body).json()
        logprobs = answer["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["top_logprobs"]) <= 3
        assert all(len(top) <= 5 for top in logprobs["top_logprobs"])
        first = logprobs["top_logprobs"][0]  # greedy: the generated token is the likeliest candidate
        assert logprobs["tokens"][0] == max(first, key=first.get)
        assert answer["usage"]["completion_tokens"] == 3
        bad = [
            ({**body, "model": "gpt-4"}, 404),
            ({**body, "temperature": 0.7}, 400),
            ({**body, "logprobs": len(VOCAB) + 1}, 400),
            ({**body, "prompt": ""}, 400),
        ]
        for request, status in bad:
            response = http.post("/v1/completions", json=request)
            assert response.status_code == status, request
            assert response.json()["error"]["message"]
        not_json = http.post(
            "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert not_json.status_code == 400


def test_no_threads_leak_after_a_concurrent_burst(server_url: str, grader: LocalLLMGrader) -> None:
    """Eight caller threads share one client (4 workers); after close() every thread is gone."""
    before = _settled_thread_count()
    client = _client(server_url, max_concurrency=4)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(client(PAIRS))
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert not errors, errors
    expected = grader(PAIRS)
    assert len(results) == 8 and all(np.allclose(r, expected, atol=1e-5) for r in results)
    assert threading.active_count() > before  # the pool and server connections were alive
    client.close()
    assert _settled_thread_count(until=before) <= before


def test_repr_and_logs_never_show_the_api_key(server_url: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-do-not-print-me"
    caplog.set_level("DEBUG")
    with _client(server_url, api_key=secret, breaker=CircuitBreaker(failure_threshold=99)) as client:
        assert secret not in repr(client) and "api_key=<set>" in repr(client)
        client(PAIRS[:1])
        with (
            pytest.raises(FallbackError, match="HTTP 404"),
            OpenAIGradeClient(server_url, "no-such-model", api_key=secret) as wrong,
        ):
            wrong(PAIRS[:1])
    assert secret not in caplog.text


def _settled_thread_count(until: int | None = None, timeout_s: float = 5.0) -> int:
    """``threading.active_count()`` once it stops changing (or reaches ``until``)."""
    end = time.monotonic() + timeout_s
    last = threading.active_count()
    while time.monotonic() < end:
        time.sleep(0.05)
        now = threading.active_count()
        if (until is not None and now <= until) or (until is None and now == last):
            return now
        last = now
    return threading.active_count()
