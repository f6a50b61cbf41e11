"""Cache the per-token states entering block ``cut`` of the teacher LLM, for every pair, resumably.

Why: stages 2-3 of the recipe train only the blocks between ``cut`` and the probe's layer. The
blocks below the cut are frozen, so their output for a pair never changes: computing it once and
reading it back makes an epoch cost only the top blocks. The same pass also keeps the last-token
state at the probe's layer (``hidden_states[probe_layer]``), which is all stage 1 reads.

Layout of ``cache_dir``::

    meta.json          the spec (model hash, template, cut, probe layer, max length, pairs hash,
                       chunk size, compute dtype, storage dtype); a cache is reused only for an
                       identical spec
    chunk-00000.npz    ``states`` (tokens of the chunk's pairs, H) float16, row after row;
                       ``lengths`` (pairs,) int32; ``probe`` (pairs, H) float32
    ...

Chunks are written atomically (temp file + rename): a killed run keeps every finished chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from darl_lite.distill.backbone import collate, pad_token_id_of, tokenize_pairs
from darl_lite.distill.cache_meta import META_NAME, prepare_cache_dir
from darl_lite.distill.decoder_blocks import DecoderParts, last_token, run_blocks
from darl_lite.distill.llm_features import TEACHER_TEMPLATE, pairs_sha256
from darl_lite.errors import InputError
from darl_lite.types import Pair

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class CutSpec:
    """What a cut cache holds."""

    model_sha256: str
    template: str
    cut: int
    probe_layer: int
    max_length: int
    pairs_sha256: str
    n_pairs: int
    chunk_size: int
    compute_dtype: str
    storage_dtype: str = "float16"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def autocast(device: torch.device, compute_dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (fp32 weights stay the masters) or nothing for fp32."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise InputError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {compute_dtype!r}")
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_layers(parts: DecoderParts, cut: int, probe_layer: int) -> None:
    """``0 <= cut <= probe_layer <= n_layers`` (``n_layers`` = the final-norm output)."""
    if not 0 <= cut <= probe_layer <= parts.n_layers:
        raise InputError(
            f"need 0 <= cut <= probe_layer <= {parts.n_layers}; got cut={cut}, probe_layer={probe_layer}"
        )


def lower_pass(
    parts: DecoderParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cut: int,
    probe_layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states[cut] (B, L, H), last-token hidden_states[probe_layer] (B, H))`` of a batch."""
    hidden = parts.embed_tokens(input_ids)
    n_blocks = min(probe_layer, parts.n_layers)
    out, captured = run_blocks(
        parts, parts.layers[:n_blocks], hidden, attention_mask, capture=(cut, n_blocks)
    )
    if probe_layer == parts.n_layers:
        out = parts.norm(out)
    return captured[cut], last_token(out, attention_mask)


def _chunk_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"chunk-{index:05d}.npz"


def _prepare(cache_dir: Path, spec: CutSpec) -> None:
    prepare_cache_dir(cache_dir, spec.as_json(), "a cut cache")


def _compute_chunk(
    parts: DecoderParts,
    encoded: list[dict[str, list[int]]],
    spec: CutSpec,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar: tqdm,
) -> dict[str, NDArray[Any]]:
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    lengths = np.asarray([len(e["input_ids"]) for e in encoded], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = np.empty((int(offsets[-1]), int(parts.config.hidden_size)), np.dtype(spec.storage_dtype))
    probe = np.empty((len(encoded), int(parts.config.hidden_size)), np.float32)
    with torch.no_grad(), autocast(device, spec.compute_dtype):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = collate([{"input_ids": encoded[i]["input_ids"]} for i in idx], pad_id, device)
            cut_states, probe_states = lower_pass(
                parts, inputs["input_ids"], inputs["attention_mask"], spec.cut, spec.probe_layer
            )
            cut_np = cut_states.float().cpu().numpy()
            probe[idx] = probe_states.float().cpu().numpy()
            for row, i in enumerate(idx):
                states[offsets[i] : offsets[i + 1]] = cut_np[row, : lengths[i]]
            bar.update(len(idx))
    if not np.isfinite(states).all():
        raise InputError(
            "cut states overflow float16 at this cut; choose another --cut (the storage is float16)"
        )
    return {"states": states, "lengths": lengths, "probe": probe}


def cache_cut_states(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    cache_dir: str | os.PathLike[str],
    *,
    model_sha256: str,
    cut: int,
    probe_layer: int,
    template: str = TEACHER_TEMPLATE,
    max_length: int = 96,
    batch_size: int = 32,
    chunk_size: int = 2048,
    compute_dtype: str = "bfloat16",
    storage_dtype: str = "float16",
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> CutCache:
    """Compute every missing chunk of the cut cache of ``pairs``, then load the whole cache.

    ``storage_dtype`` is ``"float16"`` (half the disk) or ``"float32"`` (exact). ``on_chunk(index)``
    is called after each newly written chunk (progress reports; tests interrupt a run with it).
    """
    if storage_dtype not in ("float16", "float32"):
        raise InputError(f"storage_dtype must be 'float16' or 'float32'; got {storage_dtype!r}")
    if chunk_size < 1 or batch_size < 1:
        raise InputError(f"chunk_size and batch_size must be >= 1; got {chunk_size}, {batch_size}")
    parts = DecoderParts.of(model)
    check_layers(parts, cut, probe_layer)
    dev = torch.device(device)
    spec = CutSpec(
        model_sha256,
        template,
        cut,
        probe_layer,
        max_length,
        pairs_sha256(pairs),
        len(pairs),
        chunk_size,
        compute_dtype,
        storage_dtype,
    )
    cache = Path(cache_dir)
    _prepare(cache, spec)
    pad_id = pad_token_id_of(model, tokenizer)
    model.eval()
    n_chunks = (len(pairs) + chunk_size - 1) // chunk_size
    todo = [i for i in range(n_chunks) if not _chunk_path(cache, i).exists()]
    bar = tqdm(total=len(pairs), desc=f"cut-{cut} states", unit="pair", disable=not progress)
    bar.update(len(pairs) - sum(len(pairs[i * chunk_size : (i + 1) * chunk_size]) for i in todo))
    try:
        for index in todo:
            chunk = pairs[index * chunk_size : (index + 1) * chunk_size]
            encoded = tokenize_pairs(tokenizer, chunk, max_length, token_type_ids=False, template=template)
            arrays = _compute_chunk(parts, encoded, spec, batch_size, pad_id, dev, bar)
            path = _chunk_path(cache, index)
            tmp = path.with_name(path.name + ".tmp.npz")
            named: dict[str, Any] = arrays
            np.savez(tmp, **named)
            os.replace(tmp, path)
            if on_chunk is not None:
                on_chunk(index)
    finally:
        bar.close()
    return CutCache.load(cache)


class CacheIncomplete(InputError):
    """The cut cache is missing chunks (a time-boxed pass stopped); run the command again to resume."""


class CutCache:
    """A loaded cut cache: per-token states of every pair (float16) and the probe-layer features."""

    def __init__(
        self,
        spec: CutSpec,
        states: NDArray[np.floating],
        lengths: NDArray[np.int32],
        probe: NDArray[np.float32],
    ) -> None:
        self.spec, self.states, self.lengths, self.probe = spec, states, lengths, probe
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str]) -> CutCache:
        cache = Path(cache_dir)
        meta = cache / META_NAME
        if not meta.exists():
            raise InputError(f"{cache} is not a cut cache (no {META_NAME}); build it with cache_cut_states")
        spec = CutSpec(**json.loads(meta.read_text(encoding="utf-8")))
        n_chunks = (spec.n_pairs + spec.chunk_size - 1) // spec.chunk_size
        missing = [i for i in range(n_chunks) if not _chunk_path(cache, i).exists()]
        if missing:
            raise CacheIncomplete(f"{cache} lacks {len(missing)} of {n_chunks} chunks; run the pass again")
        states, lengths, probe = [], [], []
        for i in range(n_chunks):
            with np.load(_chunk_path(cache, i), allow_pickle=False) as data:
                states.append(data["states"])
                lengths.append(data["lengths"])
                probe.append(data["probe"])
        return cls(spec, np.concatenate(states), np.concatenate(lengths), np.concatenate(probe))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(
        self, rows: Sequence[int] | NDArray[np.int64], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(states (B, L, H) float32, attention_mask (B, L))`` of cache rows."""
        rows = np.asarray(rows, np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max())
        out = np.zeros((len(rows), width, self.states.shape[1]), np.float32)
        mask = np.zeros((len(rows), width), np.int64)
        for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            start = self.offsets[row]
            out[b, :n] = self.states[start : start + n]
            mask[b, :n] = 1
        return torch.from_numpy(out).to(device or "cpu"), torch.from_numpy(mask).to(device or "cpu")

    def batches(
        self, rows: Sequence[int] | NDArray[np.int64], batch_size: int
    ) -> Iterator[tuple[NDArray[np.int64], torch.Tensor, torch.Tensor]]:
        """Length-sorted batches of ``rows`` (for evaluation): ``(positions in rows, states, mask)``."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(self.lengths[rows], kind="stable")
        for start in range(0, len(order), batch_size):
            pos = order[start : start + batch_size]
            states, mask = self.batch(rows[pos])
            yield pos, states, mask
