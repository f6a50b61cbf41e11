"""Grade pairs in process with a local Hugging Face causal LM, from the grade tokens' logprobs.

The same method as :class:`darl_lite.llm.OpenAIGradeClient`, without the network: render the
prompt, run the model once, take the log-softmax of the next-token logits, combine the variants of
each grade token (every vocabulary entry whose decoded text normalises to it, e.g. ``"1"`` and
``" 1"``) by log-sum-exp, and softmax over the grades (:mod:`darl_lite.llm.prompt`). The client
only sees the server's top-k candidates; this grader sees the whole vocabulary, so the two agree
exactly when the grade tokens are among the top k, as they are for a model that follows the prompt.

A model with a sequence-classification head (a fine-tuned grader) needs no prompt trick: use
:class:`darl_lite.distill.teachers.HFTeacher` (``kind="llm"``, ``template=...``), and make it a
:data:`darl_lite.Fallback` with :func:`darl_lite.llm.teacher_fallback` (it grades ``Pair`` objects,
the scorer passes tuples).

:class:`NextTokenModel` is the shared core that :mod:`darl_lite.distill.openai_server` serves.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.distill.backbone import collate, length_sorted_batches, local_model_dir, model_device
from darl_lite.errors import InputError
from darl_lite.llm.prompt import (
    DEFAULT_GRADE_TOKENS,
    DEFAULT_PROMPT,
    PromptTemplate,
    check_grade_tokens,
    grade_probabilities,
    normalize_token,
)
from darl_lite.types import Pair

logger = logging.getLogger(__name__)


class NextTokenModel:
    """A causal LM and its tokenizer, reduced to what grading needs: next-token log-probabilities.

    Prompts are tokenised with the tokenizer's special tokens (as vLLM does for ``/v1/completions``),
    never truncated (cutting either end would lose the instruction or the place the grade is due),
    and batched with right padding so every prompt keeps positions ``0..len-1``, hence the same
    logits at every batch size. Thread-safe: forward passes are serialised.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 8
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._token_texts: list[str] | None = None
        self._keep_param = "logits_to_keep" in inspect.signature(model.forward).parameters
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if isinstance(pad, int) else 0  # masked out: any id will do
        model.eval()

    @property
    def token_texts(self) -> list[str]:
        """The decoded text of every tokenizer id, as a server reports a candidate token."""
        if self._token_texts is None:
            ids = [[i] for i in range(len(self.tokenizer))]
            self._token_texts = list(self.tokenizer.batch_decode(ids, skip_special_tokens=False))
        return self._token_texts

    def encode(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InputError(f"prompt {prompt[:60]!r} encodes to no tokens; give it some text")
        return ids

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """``log_softmax`` of the next-token logits, ``(len(prompts), vocab)`` float32, input order."""
        return self.next_token_logprobs_ids([self.encode(p) for p in prompts])

    def next_token_logprobs_ids(self, encoded: Sequence[Sequence[int]]) -> torch.Tensor:
        """As :meth:`next_token_logprobs`, for prompts already turned into token ids."""
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        out = torch.empty((len(encoded), vocab), dtype=torch.float32)
        device = model_device(self.model)
        with self._lock, torch.no_grad():
            for idx in length_sorted_batches([len(e) for e in encoded], self.batch_size):
                batch = collate([{"input_ids": list(encoded[i])} for i in idx], self.pad_token_id, device)
                last = torch.tensor([len(encoded[i]) - 1 for i in idx], device=device)
                if self._keep_param:  # compute logits only at the positions some row ends at
                    keep, which = torch.unique(last, return_inverse=True)
                    logits = self.model(**batch, logits_to_keep=keep).logits
                    rows = logits[torch.arange(len(idx), device=device), which]
                else:
                    logits = self.model(**batch).logits
                    rows = logits[torch.arange(len(idx), device=device), last]
                out[idx] = torch.log_softmax(rows.float(), dim=-1).cpu()
        return out


class LocalLLMGrader:
    """Grade probabilities from a local causal LM's next-token logprobs over the grade tokens.

    Implements :class:`darl_lite.Teacher` (``predict_proba``, float32) and :data:`darl_lite.Fallback`
    (calling it, float64). ``grade_tokens[g]`` stands for grade ``g``; each must be a single token of
    the tokenizer (checked here, with the fix in the message).
    """

    kind: str = "llm"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        grade_tokens: Sequence[str] = DEFAULT_GRADE_TOKENS,
        prompt_template: str | PromptTemplate = DEFAULT_PROMPT,
        *,
        name: str | None = None,
        batch_size: int = 8,
    ) -> None:
        self.lm = NextTokenModel(model, tokenizer, batch_size=batch_size)
        self.grade_tokens = check_grade_tokens(grade_tokens)
        self.prompt = PromptTemplate.coerce(prompt_template)
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        texts = [normalize_token(t) for t in self.lm.token_texts]
        self.grade_token_ids: tuple[tuple[int, ...], ...] = tuple(
            tuple(i for i, t in enumerate(texts) if t == grade) for grade in self.grade_tokens
        )
        for grade, ids in zip(self.grade_tokens, self.grade_token_ids, strict=True):
            if not ids:
                pieces = tokenizer.tokenize(grade)
                raise InputError(
                    f"grade token {grade!r} is not a single token of this tokenizer (it splits into "
                    f"{pieces}); pick grade_tokens that are, e.g. digits or one-token words"
                )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        grade_tokens: Sequence[str] = DEFAULT_GRADE_TOKENS,
        prompt_template: str | PromptTemplate = DEFAULT_PROMPT,
        *,
        name: str | None = None,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ) -> LocalLLMGrader:
        """Load a causal LM and its tokenizer from a local folder (never a hub)."""
        folder = local_model_dir(path, "LLM path")
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(
            model,
            tokenizer,
            grade_tokens,
            prompt_template,
            name=name or folder.resolve().name,
            batch_size=batch_size,
        )

    def grade_logprobs(self, pairs: Sequence[Pair | tuple[str, str]]) -> NDArray[np.float64]:
        """Per-grade log-probabilities ``(len(pairs), n_grades)``, variants combined by log-sum-exp."""
        prompts = [self.prompt.render(*_texts(p)) for p in pairs]
        out = np.empty((len(prompts), len(self.grade_tokens)), np.float64)
        if not prompts:
            return out
        logprobs = self.lm.next_token_logprobs(prompts).double()
        for g, ids in enumerate(self.grade_token_ids):
            out[:, g] = torch.logsumexp(logprobs[:, list(ids)], dim=-1).numpy()
        return out

    def __call__(self, pairs: Sequence[Pair | tuple[str, str]]) -> NDArray[np.float64]:
        """Grade probabilities ``(len(pairs), n_grades)`` in input order, float64 (a Fallback)."""
        lp = self.grade_logprobs(pairs)
        return lp if len(lp) == 0 else grade_probabilities(lp)

    def predict_proba(self, pairs: Sequence[Pair | tuple[str, str]]) -> NDArray[np.float32]:
        """Grade probabilities ``(len(pairs), n_grades)``, float32 (the Teacher protocol)."""
        return self(pairs).astype(np.float32)

    def __repr__(self) -> str:
        return f"LocalLLMGrader(name={self.name!r}, grade_tokens={self.grade_tokens!r})"


def _texts(pair: Pair | tuple[str, str]) -> tuple[str, str]:
    if isinstance(pair, Pair):
        return pair.query, pair.item
    if isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(t, str) for t in pair):
        return pair[0], pair[1]
    raise InputError(f"a pair must be a Pair or a (query, item) tuple of strings; got {pair!r:.80}")


__all__ = ["LocalLLMGrader", "NextTokenModel"]
