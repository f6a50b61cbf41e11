"""A teacher backed by a local Hugging Face model with a sequence-classification head.

Works for encoders (BERT-style cross-encoders) and decoder LLMs (``Qwen2ForSequenceClassification``,
``LlamaForSequenceClassification``…). Decoder heads score the *last non-pad token*: transformers
(4.45+) takes, per row, the rightmost position whose ``input_ids`` differ from
``config.pad_token_id``. Two things make that safe here, whatever the tokenizer's ``padding_side``:

* we pad every batch ourselves, on the right, with ``config.pad_token_id`` (see
  :func:`darl_lite.distill.backbone.collate`), so the pooled token is the pair's last real token and
  its position id is the same at every batch size (left padding would shift the default position
  ids of a causal model by the amount of padding, and so change the logits);
* a decoder without a pad token gets ``pad_token_id = eos_token_id``, the convention its head was
  trained with when fine-tuned through transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from darl_lite.distill.backbone import (
    accepts_token_type_ids,
    collate,
    length_sorted_batches,
    local_model_dir,
    model_device,
    tokenize_pairs,
)
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

TeacherKind = Literal["encoder", "llm"]
#: Show a progress bar from this many pairs on (short calls stay quiet).
_PROGRESS_MIN_PAIRS = 512


class HFTeacher:
    """Grade probabilities from a local sequence-classification model: ``softmax(logits)``.

    Implements :class:`darl_lite.teacher.Teacher`. ``template`` (``str.format`` with ``{query}`` and
    ``{item}``) turns each pair into one prompt, as LLM graders are usually trained; without it the
    pair is encoded as a tokenizer sentence pair. Rows come back in input order and do not depend on
    ``batch_size`` (batches are length-sorted internally for speed).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        kind: TeacherKind = "encoder",
        max_length: int = 128,
        batch_size: int = 32,
        template: str | None = None,
        progress: bool | None = None,
    ) -> None:
        if kind not in ("encoder", "llm"):
            raise InputError(f"kind must be 'encoder' or 'llm'; got {kind!r}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        if max_length < 2:
            raise InputError(f"max_length must be >= 2 tokens; got {max_length}")
        if template is not None and ("{query}" not in template or "{item}" not in template):
            raise InputError(f"template must contain both '{{query}}' and '{{item}}'; got {template!r}")
        self.name = name
        self.kind: str = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.template = template
        self.progress = progress
        self.pad_token_id = self._resolve_pad_token_id()
        self._token_type_ids = accepts_token_type_ids(model)
        model.eval()

    def _resolve_pad_token_id(self) -> int:
        """Pick the pad id and write it into the model config, which decoder heads pool by."""
        config = self.model.config
        pad = config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            pad = eos
        if pad is None:
            if self.kind == "llm":
                raise InputError(
                    f"teacher {self.name!r} has neither a pad nor an eos token id; set "
                    "model.config.pad_token_id so the classification head can find each pair's last token"
                )
            pad = 0
        config.pad_token_id = int(pad)
        return int(pad)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        name: str | None = None,
        kind: TeacherKind = "encoder",
        max_length: int = 128,
        batch_size: int = 32,
        *,
        template: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HFTeacher:
        """Load model and tokenizer from a local folder (never a hub); ``name`` defaults to its name."""
        folder = local_model_dir(path, "teacher path")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(
            model,
            tokenizer,
            name=name or folder.resolve().name,
            kind=kind,
            max_length=max_length,
            batch_size=batch_size,
            template=template,
        )

    def predict_logits(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        """Raw head logits ``(len(pairs), n_labels)`` in input order."""
        n_labels = int(self.model.config.num_labels)
        out = np.empty((len(pairs), n_labels), dtype=np.float32)
        if not pairs:
            return out
        features = tokenize_pairs(
            self.tokenizer,
            pairs,
            self.max_length,
            token_type_ids=self._token_type_ids,
            template=self.template,
        )
        device = model_device(self.model)
        show = self.progress if self.progress is not None else len(pairs) >= _PROGRESS_MIN_PAIRS
        with (
            torch.no_grad(),
            tqdm(total=len(pairs), desc=f"teacher {self.name}", unit="pair", disable=not show) as bar,
        ):
            for idx in length_sorted_batches([len(f["input_ids"]) for f in features], self.batch_size):
                inputs = collate([features[i] for i in idx], self.pad_token_id, device)
                out[idx] = self.model(**inputs).logits.float().cpu().numpy()
                bar.update(len(idx))
        return out

    def predict_proba(self, pairs: Sequence[Pair]) -> NDArray[np.float32]:
        """Grade probabilities ``(len(pairs), n_labels)``, each row summing to 1, in input order."""
        logits = self.predict_logits(pairs)
        if logits.shape[0] == 0:
            return logits
        return torch.softmax(torch.from_numpy(logits), dim=-1).numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"HFTeacher(name={self.name!r}, kind={self.kind!r}, max_length={self.max_length})"
