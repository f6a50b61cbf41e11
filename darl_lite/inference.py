"""Tokenise pairs and run the ONNX graph: grade logits and pooled representation in one pass.

This is the only place the runtime touches onnxruntime and tokenizers. Pairs are tokenised once,
sorted by length and cut into bounded batches, each padded only to its own longest pair, so short
pairs never pay for long ones and memory stays flat however many pairs arrive.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

from darl_lite.errors import BundleError, InputError

logger = logging.getLogger(__name__)

#: Texts are cut at this many characters per allowed token before tokenising: no token of a
#: WordPiece/BPE vocabulary covers more, so the kept ids are unchanged, and a 1 MB item costs
#: no more than a long one. The cut is reported as truncation.
CHARS_PER_TOKEN_CAP = 100
#: Pairs tokenised and run per chunk of a long call (bounds the memory of one call).
CHUNK_PAIRS = 1024
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime session options, explicit so a search node controls its own CPU budget.

    ``intra_op_threads=0`` lets onnxruntime pick (one per physical core).
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def session_options(self) -> ort.SessionOptions:
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.graph_optimization not in levels:
            raise InputError(
                f"graph_optimization must be one of {sorted(levels)}, got {self.graph_optimization!r}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError("thread counts must be >= 0 (0 lets onnxruntime choose)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = levels[self.graph_optimization]
        options.log_severity_level = 3
        return options


@dataclass(frozen=True)
class ModelOutputs:
    """Per-pair outputs in input order."""

    logits: NDArray[np.float32]  # (N, n_grades)
    pooled: NDArray[np.float32]  # (N, hidden)
    truncated: NDArray[np.bool_]  # (N,)
    n_tokens: NDArray[np.int64]  # (N,) tokens after truncation


class RelevanceModel:
    """A loaded ONNX cross-encoder plus its tokenizer. Thread-safe: ``run`` keeps no state."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        tokenizer_path: str | os.PathLike[str],
        *,
        max_length: int,
        session: SessionConfig | None = None,
        logits_name: str = "logits",
        pooled_name: str = "pooled",
        batch_size: int = 32,
    ) -> None:
        if max_length < 4:
            raise InputError(f"max_length must be >= 4 tokens, got {max_length}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        config = session or SessionConfig()
        available = set(ort.get_available_providers())
        unknown = [p for p in config.providers if p not in available]
        if unknown:
            raise InputError(
                f"onnxruntime providers {unknown} are not available here; available: {sorted(available)}"
            )
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=config.session_options(), providers=list(config.providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise BundleError(f"tokenizers cannot load {tokenizer_path}: {exc}") from exc
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.max_length = max_length
        self.batch_size = batch_size
        self.input_names = [i.name for i in self.session.get_inputs()]
        supported = {"input_ids", "attention_mask", "token_type_ids"}
        odd = [n for n in self.input_names if n not in supported]
        if odd:
            raise BundleError(f"{model_path} expects inputs {odd}; darl-lite feeds only {sorted(supported)}")
        outputs = [o.name for o in self.session.get_outputs()]
        for name in (logits_name, pooled_name):
            if name not in outputs:
                raise BundleError(f"{model_path} has no output {name!r}; it has {outputs}")
        self.output_names = [logits_name, pooled_name]
        self.n_grades = self._static_dim(logits_name)
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is None:
            pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = int(pad or 0)
        self._char_cap = max_length * CHARS_PER_TOKEN_CAP

    def _static_dim(self, output_name: str) -> int | None:
        shape = next(o.shape for o in self.session.get_outputs() if o.name == output_name)
        last = shape[-1] if shape else None
        return last if isinstance(last, int) else None

    def run(self, queries: Sequence[str], items: Sequence[str]) -> ModelOutputs:
        """Logits and pooled representation for pairs ``(queries[i], items[i])``, in input order."""
        n = len(queries)
        if n != len(items):
            raise InputError(f"got {n} queries but {len(items)} items; pairs need one of each")
        if n == 0:
            width = self.n_grades or 0
            return ModelOutputs(
                np.zeros((0, width), np.float32),
                np.zeros((0, 0), np.float32),
                np.zeros(0, bool),
                np.zeros(0, np.int64),
            )
        if n <= CHUNK_PAIRS:
            return self._run_chunk(queries, items)
        # Long calls go chunk by chunk, so tokenizer encodings and padded batches of only one
        # chunk are alive at a time: peak memory stays flat however many pairs arrive.
        parts = [
            self._run_chunk(queries[start : start + CHUNK_PAIRS], items[start : start + CHUNK_PAIRS])
            for start in range(0, n, CHUNK_PAIRS)
        ]
        return ModelOutputs(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.pooled for p in parts]),
            np.concatenate([p.truncated for p in parts]),
            np.concatenate([p.n_tokens for p in parts]),
        )

    def _run_chunk(self, queries: Sequence[str], items: Sequence[str]) -> ModelOutputs:
        n = len(queries)
        cap = self._char_cap
        cut = np.fromiter(
            (len(q) > cap or len(t) > cap for q, t in zip(queries, items, strict=True)), bool, n
        )
        if cut.any():
            queries = [q[:cap] for q in queries]
            items = [t[:cap] for t in items]
        encodings = self._encode(queries, items)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, n)
        truncated = cut | np.fromiter((len(e.overflowing) > 0 for e in encodings), bool, n)

        order = np.argsort(lengths, kind="stable")
        logits: NDArray[np.float32] | None = None
        pooled: NDArray[np.float32] | None = None
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            feeds = self._feeds([encodings[i] for i in index], int(lengths[index].max()))
            batch_logits, batch_pooled = self.session.run(self.output_names, feeds)
            if logits is None or pooled is None:
                logits = np.empty((n, batch_logits.shape[1]), np.float32)
                pooled = np.empty((n, batch_pooled.shape[1]), np.float32)
            logits[index] = batch_logits
            pooled[index] = batch_pooled
        assert logits is not None and pooled is not None  # n > 0 guarantees one batch
        return ModelOutputs(logits, pooled, truncated, lengths)

    def _encode(self, queries: Sequence[str], items: Sequence[str]) -> list:
        try:
            return self.tokenizer.encode_batch(list(zip(queries, items, strict=True)))
        except TypeError:
            # A lone surrogate (e.g. from a bad UTF-16 decode) cannot cross into Rust: score the
            # text with U+FFFD in its place, as a UTF-8 decoder with errors="replace" would.
            return self.tokenizer.encode_batch(
                [
                    (_LONE_SURROGATE.sub("\ufffd", q), _LONE_SURROGATE.sub("\ufffd", t))
                    for q, t in zip(queries, items, strict=True)
                ]
            )

    def _feeds(self, encodings: list, width: int) -> dict[str, NDArray[np.int64]]:
        rows = len(encodings)
        ids = np.full((rows, width), self.pad_id, np.int64)
        types = np.zeros((rows, width), np.int64)
        mask = np.zeros((rows, width), np.int64)
        for r, enc in enumerate(encodings):
            k = len(enc.ids)
            ids[r, :k] = enc.ids
            types[r, :k] = enc.type_ids
            mask[r, :k] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names}
