"""Tests of the distillation stage on tiny models built from configs (no downloads, seconds each).

Real-model runs (the packaged MiniLM backbone) carry ``@pytest.mark.slow``.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# --------------------------------------------------------------------------------------------------
# Tiny models and tokenizers
# --------------------------------------------------------------------------------------------------
from tiny_models import (  # noqa: E402
    VOCAB,
    WORDS,
    bert_tokenizer,
    decoder_tokenizer,
    tiny_bert,
    tiny_qwen,
)
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from darl_lite.distill.backbone import load_student  # noqa: E402
from darl_lite.distill.losses import (  # noqa: E402
    distillation_loss,
    hard_ce_loss,
    soft_kl_loss,
    tempered_teacher_probs,
)
from darl_lite.distill.teachers import HFTeacher  # noqa: E402
from darl_lite.distill.trainer import (  # noqa: E402
    DistillConfig,
    distill_student,
    predict_logits,
    save_student,
)
from darl_lite.errors import InputError  # noqa: E402
from darl_lite.teacher import Teacher  # noqa: E402
from darl_lite.types import GRADE_NAMES, Pair  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine torch's spinning thread
    pool makes them 50x slower; restore the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def _bert_once() -> tuple[BertForSequenceClassification, PreTrainedTokenizerFast]:
    return tiny_bert(), bert_tokenizer()


@pytest.fixture
def bert(_bert_once):
    """A fresh copy per test: training mutates the model."""
    model, tok = _bert_once
    return copy.deepcopy(model), tok


def make_pairs(n: int, seed: int = 0, graded: bool = True) -> list[Pair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))
        item = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        grade = int(rng.integers(0, 3)) if graded and i % 2 == 0 else None
        out.append(Pair(query=q, item=item, grade=grade))
    return out


def make_probs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Peaked distributions, so there is something to learn.
    return rng.dirichlet([0.5, 0.5, 0.5], size=n).astype(np.float32)


def mean_kl(teacher: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(teacher || softmax(logits)) at T = 1, in numpy."""
    log_q = logits - logits.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(teacher > 0, teacher * (np.log(teacher) - log_q), 0.0)
    return float(terms.sum(axis=1).mean())


# --------------------------------------------------------------------------------------------------
# Losses against values worked out by hand
# --------------------------------------------------------------------------------------------------
#
# The 2×3 example, at T = 2:
#   student logits z1 = [0, 0, 0]        -> z1/T = [0, 0, 0]     -> q1 = [1/3, 1/3, 1/3]
#                  z2 = [0, 2 ln 2, 0]   -> z2/T = [0, ln 2, 0]  -> q2 = [1, 2, 1]/4 = [1/4, 1/2, 1/4]
#   teacher probs  p1 = [1, 4, 4]/9      -> p1^(1/2) = [1, 2, 2]/3 -> renormalised [1/5, 2/5, 2/5]
#                  p2 = [0, 1/2, 1/2]    -> p2^(1/2) ∝ [0, 1, 1]   -> renormalised [0, 1/2, 1/2]
#   KL row 1 = 1/5 ln((1/5)/(1/3)) + 2 · 2/5 ln((2/5)/(1/3)) = 0.2 ln 0.6 + 0.8 ln 1.2
#            = 0.2 · (−0.5108256238) + 0.8 · 0.1823215568 = −0.1021651248 + 0.1458572454 = 0.0436921206
#   KL row 2 = 0 + 1/2 ln((1/2)/(1/2)) + 1/2 ln((1/2)/(1/4)) = 0.5 ln 2 = 0.3465735903
#   mean = (0.0436921206 + 0.3465735903) / 2 = 0.1951328554;  × T² = 4  -> 0.7805314218
#   gradient dL/dz2 = T · (q2 − p2^T) / N = 2 · ([1/4, 1/2, 1/4] − [0, 1/2, 1/2]) / 2 = [0.25, 0, −0.25]
# At T = 1: q2 = [1, 4, 1]/6; KL row 1 = 1/9 ln(1/3) + 8/9 ln(4/3) = −0.1220680321 + 0.2557173978
#   = 0.1336493657; KL row 2 = 0.5 ln(0.5 / (2/3)) + 0.5 ln(0.5 / (1/6)) = 0.5 ln 2.25 = 0.4054651081;
#   mean = 0.2695572369 (T² = 1).
# Cross-entropy with grades [2, −1]: only row 1 counts: −ln q1[2] at T = 1 = ln 3 = 1.0986122887.
# distillation_loss(alpha = 0.5, T = 2) = 0.5 · 0.7805314218 + 0.5 · 1.0986122887 = 0.9395718553.

LN2 = math.log(2.0)
Z = [[0.0, 0.0, 0.0], [0.0, 2 * LN2, 0.0]]
P = [[1 / 9, 4 / 9, 4 / 9], [0.0, 0.5, 0.5]]


def test_tempered_teacher_probs_by_hand() -> None:
    out = tempered_teacher_probs(torch.tensor(P, dtype=torch.float64), 2.0)
    expected = torch.tensor([[0.2, 0.4, 0.4], [0.0, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    assert out[1, 0].item() == 0.0  # zeros stay exactly zero


def test_soft_kl_loss_by_hand() -> None:
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    loss = soft_kl_loss(z, torch.tensor(P, dtype=torch.float64), temperature=2.0)
    assert loss.item() == pytest.approx(0.7805314218, abs=1e-9)
    loss.backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad[1], torch.tensor([0.25, 0.0, -0.25], dtype=torch.float64))
    t1 = soft_kl_loss(torch.tensor(Z), torch.tensor(P), temperature=1.0)
    assert t1.item() == pytest.approx(0.2695572369, abs=1e-6)


def test_soft_kl_loss_is_zero_when_student_matches_teacher() -> None:
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert soft_kl_loss(probs.log(), probs, temperature=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_ce_loss_by_hand() -> None:
    z = torch.tensor(Z)
    assert hard_ce_loss(z, torch.tensor([2, -1])).item() == pytest.approx(1.0986122887, abs=1e-6)
    # Row 2 alone: softmax([0, 2 ln 2, 0]) = [1, 4, 1]/6, so -ln(4/6) = ln 1.5 = 0.4054651081.
    assert hard_ce_loss(z, torch.tensor([-1, 1])).item() == pytest.approx(0.4054651081, abs=1e-6)


def test_hard_ce_loss_without_grades_is_zero_and_differentiable() -> None:
    z = torch.tensor(Z, requires_grad=True)
    loss = hard_ce_loss(z, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0


def test_distillation_loss_by_hand() -> None:
    z, p = torch.tensor(Z), torch.tensor(P)
    mixed = distillation_loss(z, p, torch.tensor([2, -1]), temperature=2.0, alpha=0.5)
    assert mixed.item() == pytest.approx(0.9395718553, abs=1e-6)
    # No human grade in the batch: pure KL at full weight, not alpha times it.
    pure = distillation_loss(z, p, torch.tensor([-1, -1]), temperature=2.0, alpha=0.5)
    assert pure.item() == pytest.approx(0.7805314218, abs=1e-6)
    # alpha = 0: cross-entropy only.
    ce = distillation_loss(z, p, torch.tensor([2, -1]), temperature=2.0, alpha=0.0)
    assert ce.item() == pytest.approx(1.0986122887, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: soft_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4), 2.0), "shape of student_logits"),
        (lambda: soft_kl_loss(torch.zeros(3), torch.zeros(3), 2.0), r"shape \(N, C\)"),
        (lambda: soft_kl_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), 0.0), "temperature"),
        (lambda: hard_ce_loss(torch.zeros(2, 3), torch.tensor([3, 0])), r"\[0, 3\)"),
        (lambda: hard_ce_loss(torch.zeros(2, 3), torch.tensor([0])), "grades must have shape"),
        (
            lambda: distillation_loss(
                torch.zeros(2, 3), torch.full((2, 3), 1 / 3), torch.tensor([0, 0]), alpha=2
            ),
            "alpha",
        ),
    ],
)
def test_losses_reject_bad_input(call, match: str) -> None:
    with pytest.raises(InputError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

FAST = DistillConfig(epochs=30, batch_size=8, lr=1e-2, warmup_ratio=0.0, max_length=32, seed=0)


def test_distill_student_lowers_loss_and_changes_logits(bert) -> None:
    model, tok = bert
    pairs, probs = make_pairs(24), make_probs(24)
    grades = torch.tensor([-1 if p.grade is None else p.grade for p in pairs])

    def eval_loss(logits: np.ndarray) -> float:
        return distillation_loss(
            torch.from_numpy(logits), torch.from_numpy(probs), grades, temperature=2.0, alpha=0.5
        ).item()

    before = predict_logits(model, tok, pairs)
    result = distill_student(model, tok, pairs, probs, FAST, progress=False)
    after = predict_logits(model, tok, pairs)
    assert result.steps == 30 * 3 == len(result.losses)
    assert result.pairs_seen == 30 * 24
    assert result.seconds > 0 and result.pairs_per_second > 0
    assert not np.allclose(before, after)
    assert eval_loss(after) < 0.7 * eval_loss(before)
    assert not model.training  # left in eval mode


def test_kl_training_moves_student_toward_teacher(bert) -> None:
    model, tok = bert
    pairs, probs = make_pairs(16, seed=1, graded=False), make_probs(16, seed=1)
    before = mean_kl(probs, predict_logits(model, tok, pairs))
    config = DistillConfig(epochs=20, batch_size=16, lr=1e-2, warmup_ratio=0.0, alpha=1.0, temperature=1.0)
    distill_student(model, tok, pairs, probs, config, progress=False)
    after = mean_kl(probs, predict_logits(model, tok, pairs))
    assert after < 0.5 * before
    agree = (predict_logits(model, tok, pairs).argmax(1) == probs.argmax(1)).mean()
    assert agree >= 0.75


def test_distill_student_is_seeded_and_respects_max_steps(_bert_once) -> None:
    base, tok = _bert_once
    pairs, probs = make_pairs(20), make_probs(20)
    config = DistillConfig(epochs=5, batch_size=4, lr=1e-3, max_steps=7, seed=3)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        result = distill_student(model, tok, pairs, probs, config, progress=False)
        assert result.steps == 7
        runs.append((result.losses, predict_logits(model, tok, pairs)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_predict_logits_keeps_input_order_and_handles_empty(bert) -> None:
    model, tok = bert
    pairs = make_pairs(11, seed=4)
    together = predict_logits(model, tok, pairs, batch_size=4)
    one_by_one = np.concatenate([predict_logits(model, tok, [p], batch_size=1) for p in pairs])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    empty = predict_logits(model, tok, [])
    assert empty.shape == (0, 3) and empty.dtype == np.float32


def test_save_and_reload_round_trip(bert, tmp_path: Path) -> None:
    model, tok = bert
    pairs, probs = make_pairs(12), make_probs(12)
    distill_student(model, tok, pairs, probs, DistillConfig(max_steps=2, batch_size=4), progress=False)
    out = save_student(model, tok, tmp_path / "student")
    assert (out / "model.safetensors").is_file()
    reloaded, retok = load_student(out, n_grades=3, max_length=32)
    assert reloaded.config.id2label == dict(enumerate(GRADE_NAMES))
    np.testing.assert_array_equal(predict_logits(model, tok, pairs), predict_logits(reloaded, retok, pairs))


@pytest.mark.parametrize(
    ("pairs", "probs", "match"),
    [
        ([], np.zeros((0, 3), np.float32), "no pairs"),
        (make_pairs(4), make_probs(3), r"shape \(len\(pairs\), n_labels\) = \(4, 3\)"),
        (make_pairs(4), np.full((4, 2), 0.5, np.float32), r"\(4, 3\)"),
        (make_pairs(4), np.full((4, 3), 0.5, np.float32), "sum to 1"),
        (make_pairs(2), np.array([[1.5, -0.5, 0.0], [0.2, 0.3, 0.5]], np.float32), ">= 0"),
        (make_pairs(2), np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]], np.float32), "finite"),
        ([Pair("a", "b", grade=3)], np.full((1, 3), 1 / 3, np.float32), r"grade must be None or in \[0, 3\)"),
    ],
)
def test_distill_student_rejects_bad_input(bert, pairs, probs, match: str) -> None:
    model, tok = bert
    with pytest.raises(InputError, match=match):
        distill_student(model, tok, pairs, probs, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ],
)
def test_distill_config_rejects_bad_values(kwargs, match: str) -> None:
    with pytest.raises(InputError, match=match):
        DistillConfig(**kwargs)


def test_load_student_refuses_non_local_backbone(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="never downloads"):
        load_student("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(InputError, match=r"config\.json"):
        load_student(tmp_path)


# --------------------------------------------------------------------------------------------------
# HF teachers
# --------------------------------------------------------------------------------------------------


def _check_teacher(teacher: HFTeacher, pairs: list[Pair]) -> np.ndarray:
    as_teacher: Teacher = teacher  # the protocol, checked by mypy here and at run time below
    assert isinstance(as_teacher, Teacher)
    teacher.batch_size = 1
    one = teacher.predict_proba(pairs)
    teacher.batch_size = 7
    seven = teacher.predict_proba(pairs)
    assert one.shape == (len(pairs), 3) and one.dtype == np.float32
    np.testing.assert_allclose(one.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(one, seven, atol=1e-5)
    # Input order: the reversed input gives the reversed rows.
    np.testing.assert_allclose(teacher.predict_proba(pairs[::-1]), seven[::-1], atol=1e-5)
    assert teacher.predict_proba([]).shape == (0, 3)
    return seven


def test_hf_teacher_encoder(_bert_once) -> None:
    model, tok = _bert_once
    teacher = HFTeacher(copy.deepcopy(model), tok, name="tiny-bert", kind="encoder")
    _check_teacher(teacher, make_pairs(19, seed=5))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hf_teacher_decoder_is_padding_safe(padding_side: str) -> None:
    pairs = make_pairs(19, seed=6)
    tok = decoder_tokenizer()
    tok.padding_side = padding_side
    model = tiny_qwen()
    teacher = HFTeacher(model, tok, name="tiny-qwen", kind="llm", max_length=64)
    probs = _check_teacher(teacher, pairs)
    # Against the model run on each pair alone, with no padding at all.
    for i in (0, 7, 18):
        ids = tok(pairs[i].query, pairs[i].item, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = torch.softmax(model(input_ids=ids).logits, dim=-1)[0].numpy()
        np.testing.assert_allclose(probs[i], alone, atol=1e-5)


def test_hf_teacher_decoder_without_pad_uses_eos() -> None:
    tok = decoder_tokenizer()
    model = tiny_qwen(pad_token_id=None)
    teacher = HFTeacher(model, tok, name="tiny-qwen", kind="llm")
    # The tokenizer's pad token is taken first; the config then agrees with what we pad with.
    assert model.config.pad_token_id == teacher.pad_token_id == VOCAB["[PAD]"]
    _check_teacher(teacher, make_pairs(9, seed=7))
    tok_no_pad = decoder_tokenizer()
    tok_no_pad.pad_token = None
    eos_teacher = HFTeacher(tiny_qwen(pad_token_id=None), tok_no_pad, name="q", kind="llm")
    assert eos_teacher.pad_token_id == VOCAB["<eos>"]


def test_hf_teacher_from_pretrained_with_template(tmp_path: Path) -> None:
    model, tok = tiny_qwen(), decoder_tokenizer()
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    teacher = HFTeacher.from_pretrained(
        tmp_path / "qwen", kind="llm", batch_size=4, template="query {query} item {item}"
    )
    assert teacher.name == "qwen" and teacher.kind == "llm"
    _check_teacher(teacher, make_pairs(10, seed=8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "gpt"}, "kind must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"template": "{query} only"}, "template must contain"),
    ],
)
def test_hf_teacher_rejects_bad_arguments(_bert_once, kwargs, match: str) -> None:
    model, tok = _bert_once
    with pytest.raises(InputError, match=match):
        HFTeacher(model, tok, name="t", **kwargs)


def test_hf_teacher_from_pretrained_refuses_hub_ids() -> None:
    with pytest.raises(InputError, match="never downloads"):
        HFTeacher.from_pretrained("Qwen/Qwen2-0.5B")


# --------------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------------


def test_missing_torch_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from darl_lite.errors import MissingExtraError\n"
        "try:\n"
        "    import darl_lite.distill\n"
        "except MissingExtraError as exc:\n"
        "    print('OK', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("OK") and "darl-lite[distill]" in out


def test_importing_distill_is_lazy() -> None:
    code = "import sys, darl_lite.distill; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Real backbone
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_student_trains() -> None:
    model, tok = load_student()
    assert model.config.num_labels == 3 and model.config.id2label[2] == "strong"
    pairs, probs = make_pairs(64, seed=9), make_probs(64, seed=9)
    before = predict_logits(model, tok, pairs)
    result = distill_student(
        model, tok, pairs, probs, DistillConfig(epochs=2, batch_size=16, max_steps=5, lr=1e-4), progress=False
    )
    assert result.steps == 5
    assert all(math.isfinite(x) for x in result.losses)
    assert not np.allclose(before, predict_logits(model, tok, pairs), atol=1e-4)
