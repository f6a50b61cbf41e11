"""The shared training loop (darl_lite.distill.train_loop): the step, the batches, and the checkpoints
that let fine-tuning resume where it stopped (tiny BERT built from a config; seconds)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import WORDS, bert_tokenizer, tiny_bert

from darl_lite.distill.graded_loss import graded_distillation_loss
from darl_lite.distill.stages import finetune
from darl_lite.distill.train_loop import Checkpoints, length_bucketed_batches, optimizer_step, total_steps
from darl_lite.errors import InputError
from darl_lite.types import Pair


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pairs(n: int = 24) -> list[Pair]:
    return [Pair(WORDS[i % len(WORDS)], f"{WORDS[(i * 7) % len(WORDS)]} x", grade=i % 3) for i in range(n)]


def _targets(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    grades = np.array([p.grade for p in pairs], dtype=np.int64)
    return np.eye(3, dtype=np.float32)[grades] * 0.8 + 0.2 / 3, grades


class _Interrupt(Exception):
    pass


def _loss(stop_at: int | None = None) -> Any:
    calls = [0]

    def loss_fn(logits: torch.Tensor, probs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if stop_at is not None and calls[0] == stop_at:
            raise _Interrupt
        return graded_distillation_loss(logits, probs, grades, alpha=0.5, temperature=1.0)

    return loss_fn


def test_finetune_resumes_from_its_checkpoint_with_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start, tokenizer = tiny_bert(), bert_tokenizer()
    pairs = _pairs()
    probs, grades = _targets(pairs)
    kwargs: dict[str, Any] = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "max_length": 16}

    reference, ref_result = finetune(copy.deepcopy(start), tokenizer, pairs, probs, grades, _loss(), **kwargs)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):  # stopped in the middle of the second epoch (step 5 of 9)
        finetune(copy.deepcopy(start), tokenizer, pairs, probs, grades, _loss(stop_at=5), **kwargs,
                 checkpoint_dir=ckpt, checkpoint_every=2)  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000004"]
    resumed, result = finetune(copy.deepcopy(start), tokenizer, pairs, probs, grades, _loss(), **kwargs,
                               checkpoint_dir=ckpt, checkpoint_every=2)  # fmt: skip
    assert result.steps == ref_result.steps == 9
    assert result.losses == ref_result.losses
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name

    other = {**kwargs, "lr": 1e-3}
    with pytest.raises(InputError, match="belongs to another run"):
        finetune(copy.deepcopy(start), tokenizer, pairs, probs, grades, _loss(), **other, checkpoint_dir=ckpt)


def test_optimizer_step_refuses_a_non_finite_loss() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    value = optimizer_step((weight**2).sum(), optimizer, [weight], 1.0, step=1, what="toy")
    assert value == 2.0 and torch.all(weight < 1.0), "the step moved the weight downhill"
    with pytest.raises(FloatingPointError, match="toy loss became nan at step 7; lower the learning rate"):
        optimizer_step((weight * float("nan")).sum(), optimizer, [weight], None, step=7, what="toy")


def test_batches_cover_every_pair_once_and_steps_are_capped() -> None:
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(3, 40, size=103))
    batches = length_bucketed_batches(lengths, 10, rng)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert len(batches) == 11 and all(len(b) <= 10 for b in batches)
    assert total_steps(103, 10, 3, None) == 33 and total_steps(103, 10, 3, 5) == 5
    with pytest.raises(InputError, match="checkpoint_every must be >= 1"):
        Checkpoints(Path("unused"), "f", every=0)
