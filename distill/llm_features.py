"""Cache a decoder LLM's last-token hidden states for every pair, once, resumably.

Why: on a CPU the teacher's forward pass is the whole cost of tuning it with a linear probe and of
labelling every pair with the tuned teacher. Both read the same vectors (the input of a
``*ForSequenceClassification`` head: the last real token's hidden state), so they are computed once
and stored in chunks. An interrupted run keeps every finished chunk and continues with the next one.

Layout of ``cache_dir``::

    meta.json            what the vectors are (model hash, template, layers, max length, pairs hash)
    chunk-00000.npz      one array per layer, ``layer_<i>`` (rows = pairs of this chunk, in order)
    ...

``hidden_states[i]`` follows transformers: 0 is the embedding output, ``i`` the output of block
``i``; the last entry is the final-norm output, exactly what the classification head reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from darl_lite.datasets import SPLIT_NAMES, Splits
from darl_lite.distill.backbone import collate, pad_token_id_of, tokenize_pairs
from darl_lite.distill.cache_meta import META_NAME as META_NAME  # re-exported: the cache layout
from darl_lite.distill.cache_meta import prepare_cache_dir
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

#: The grading prompt: short on purpose (the forward pass is the cost), the item last so the
#: pooled token has read both texts.
TEACHER_TEMPLATE = "Query: {query}\nEntity: {item}\nRelevance:"


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature cache holds; a cache is reused only for an identical spec."""

    model_sha256: str
    template: str
    layers: tuple[int, ...]
    max_length: int
    pairs_sha256: str
    chunk_size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "model_sha256": self.model_sha256,
            "template": self.template,
            "layers": list(self.layers),
            "max_length": self.max_length,
            "pairs_sha256": self.pairs_sha256,
            "chunk_size": self.chunk_size,
        }


def pairs_sha256(pairs: Sequence[Pair]) -> str:
    """A digest of the pairs' texts in order (grades are not part of it: they are never read)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.query.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
        digest.update(pair.item.encode("utf-8", "surrogatepass"))
        digest.update(b"\x01")
    return digest.hexdigest()


def distinct_pairs(splits: Splits) -> list[Pair]:
    """Every distinct (query, item) of all splits, split by split in :data:`SPLIT_NAMES` order."""
    seen: set[tuple[str, str]] = set()
    out: list[Pair] = []
    for name in SPLIT_NAMES:
        for pair in splits.split(name):
            if pair.key not in seen:
                seen.add(pair.key)
                out.append(pair)
    return out


def _chunk_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"chunk-{index:05d}.npz"


def _prepare(cache_dir: Path, spec: FeatureSpec) -> None:
    prepare_cache_dir(cache_dir, spec.as_json(), "features")


def _last_token_states(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    layers: Sequence[int],
) -> dict[int, NDArray[np.float32]]:
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states
    last = inputs["attention_mask"].sum(-1) - 1  # batches are right-padded (collate)
    rows = torch.arange(last.shape[0])
    return {layer: hidden[layer][rows, last].float().numpy() for layer in layers}


def cache_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    cache_dir: str | os.PathLike[str],
    *,
    model_sha256: str,
    layers: Sequence[int] = (-1,),
    template: str = TEACHER_TEMPLATE,
    max_length: int = 96,
    batch_size: int = 32,
    chunk_size: int = 2048,
    progress: bool = True,
) -> dict[int, NDArray[np.float32]]:
    """``{layer: (N, H) float32}`` last-token hidden states of ``pairs``, computed once per chunk.

    Keys are the resolved (non-negative) ``hidden_states`` indices: with 24 blocks, ``-1`` comes
    back as ``24``.

    ``layers`` index ``hidden_states`` (negative from the end; ``-1`` is the head's input). Finished
    chunks are read back, missing ones computed and written atomically, so a killed run resumes.
    """
    if chunk_size < 1 or batch_size < 1:
        raise InputError(f"chunk_size and batch_size must be >= 1; got {chunk_size}, {batch_size}")
    n_states = int(model.config.num_hidden_layers) + 1
    resolved = tuple(sorted({layer % n_states for layer in layers}))
    if any(not -n_states <= layer < n_states for layer in layers):
        raise InputError(f"layers must lie in [-{n_states}, {n_states}); got {list(layers)}")
    cache = Path(cache_dir)
    spec = FeatureSpec(model_sha256, template, resolved, max_length, pairs_sha256(pairs), chunk_size)
    _prepare(cache, spec)
    pad_id = pad_token_id_of(model, tokenizer)
    model.eval()
    n_chunks = (len(pairs) + chunk_size - 1) // chunk_size
    done = sum(_chunk_path(cache, i).exists() for i in range(n_chunks))
    bar = tqdm(total=len(pairs), desc="teacher features", unit="pair", disable=not progress)
    bar.update(min(len(pairs), done * chunk_size))
    parts: dict[int, list[NDArray[np.float32]]] = {layer: [] for layer in resolved}
    try:
        for index in range(n_chunks):
            chunk = pairs[index * chunk_size : (index + 1) * chunk_size]
            path = _chunk_path(cache, index)
            if not path.exists():
                arrays = compute_states(
                    model, tokenizer, chunk, resolved, template, max_length, batch_size, pad_id, bar
                )
                tmp = path.with_name(path.name + ".tmp.npz")
                named: dict[str, Any] = {f"layer_{layer}": arrays[layer] for layer in resolved}
                np.savez(tmp, **named)
                os.replace(tmp, path)
            with np.load(path, allow_pickle=False) as data:
                for layer in resolved:
                    parts[layer].append(data[f"layer_{layer}"])
    finally:
        bar.close()
    return {
        layer: np.concatenate(parts[layer]) if parts[layer] else np.zeros((0, 0), np.float32)
        for layer in resolved
    }


def compute_states(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chunk: Sequence[Pair],
    layers: tuple[int, ...],
    template: str,
    max_length: int,
    batch_size: int,
    pad_id: int,
    bar: tqdm,
) -> dict[int, NDArray[np.float32]]:
    """``{layer: (len(chunk), H)}`` last-token states of ``chunk``, length-sorted batches, input order."""
    encoded = tokenize_pairs(tokenizer, chunk, max_length, token_type_ids=False, template=template)
    order = sorted(range(len(chunk)), key=lambda i: len(encoded[i]["input_ids"]))
    out: dict[int, NDArray[np.float32]] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = collate([encoded[i] for i in idx], pad_id, torch.device("cpu"))
            states = _last_token_states(model, inputs, layers)
            for layer, values in states.items():
                if layer not in out:
                    out[layer] = np.empty((len(chunk), values.shape[-1]), dtype=np.float32)
                out[layer][idx] = values
            bar.update(len(idx))
    return out
