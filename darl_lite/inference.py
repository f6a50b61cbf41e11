"""Tokenise pairs and run the ONNX graph: grade logits, pooled representation and (for bundles
that carry it) the OOD score in one pass.

This is the only place the runtime touches onnxruntime (tokenizers: :mod:`darl_lite.pair_tokens`).
Pairs are tokenised once, sorted by length and cut into bounded batches, each padded only to its
own longest pair, so short pairs never pay for long ones and memory stays flat however many pairs
arrive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from darl_lite.errors import BundleError, InputError
from darl_lite.pair_tokens import PairEncoder, TokenRows

logger = logging.getLogger(__name__)

#: Texts are cut at this many characters per allowed token before tokenising: no token of a
#: WordPiece/BPE vocabulary covers more, so the kept ids are unchanged, and a 1 MB item costs
#: no more than a long one. The cut is reported as truncation.
CHARS_PER_TOKEN_CAP = 100
#: Pairs tokenised and run per chunk of a long call (bounds the memory of one call).
CHUNK_PAIRS = 1024
#: A new batch is cut before a longer pair when padding the batch's rows to its length would cost
#: more than this many padded tokens: about onnxruntime's fixed cost of one more run (measured on
#: the MiniLM-L6 int8 graph, 2 threads: 0.5 ms, as much as 15 tokens; the cut made 10-, 100- and
#: 1000-item calls 1.09x, 1.07x and 1.06x faster there, 10 and 100 items 1.17x and 1.12x at 1
#: thread; docs/benchmarks.md). 0 turns the cut off (batches of ``batch_size`` only).
RUN_COST_TOKENS = 16
#: Graph output with the OOD score, when the export wrote it into the graph (darl_lite.export.ood_graph).
OOD_OUTPUT = "ood_distance"


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime session options, explicit so a search node controls its own CPU budget.

    ``intra_op_threads=0`` lets onnxruntime pick (one per physical core).

    ``disabled_optimizers`` names onnxruntime graph rewrites to skip. ``SkipLayerNormFusion`` is
    skipped by default: on the benchmark CPU (onnxruntime 1.32) its fused kernel cost about nine
    times a plain LayerNormalization plus Add on the same 14-token batches, and skipping it made the
    int8 graph 1.15x faster at 2 threads and 1.2x at 1 thread (docs/benchmarks.md, "Graph levers").
    Pass ``()`` to let onnxruntime apply every rewrite.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    disabled_optimizers: tuple[str, ...] = ("SkipLayerNormFusion",)
    #: onnxruntime's worker threads spin between ops (and a while after a run) instead of sleeping:
    #: faster alone, but a neighbouring session on the same cores pays for the spin (see
    #: ``python -m bench.small_requests``, "neighbour" layout).
    spinning: bool = True

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
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def create_session(
        self,
        model_path: str | os.PathLike[str],
        *,
        optimized_model_path: str | os.PathLike[str] | None = None,
    ) -> ort.InferenceSession:
        """An onnxruntime session on ``model_path`` with these options (raises onnxruntime's errors).

        ``optimized_model_path`` also writes the graph as onnxruntime rewrote it, to see what runs.
        """
        if isinstance(self.disabled_optimizers, str):
            raise InputError("disabled_optimizers must be a tuple of optimizer names, not one string")
        options = self.session_options()
        if optimized_model_path is not None:
            options.optimized_model_filepath = str(optimized_model_path)
        return ort.InferenceSession(
            str(model_path),
            sess_options=options,
            providers=list(self.providers),
            disabled_optimizers=list(self.disabled_optimizers),
        )


@dataclass(frozen=True)
class ModelOutputs:
    """Per-pair outputs in input order."""

    logits: NDArray[np.float32]  # (N, n_grades)
    pooled: NDArray[np.float32]  # (N, hidden)
    truncated: NDArray[np.bool_]  # (N,)
    n_tokens: NDArray[np.int64]  # (N,) tokens after truncation
    #: (N,) the graph's own OOD score (OOD_OUTPUT), or None for a graph without it
    ood: NDArray[np.float32] | None = None

    def rows(self, start: int, stop: int) -> ModelOutputs:
        """Pairs ``start:stop`` of every array (views, not copies)."""
        return ModelOutputs(
            self.logits[start:stop],
            self.pooled[start:stop],
            self.truncated[start:stop],
            self.n_tokens[start:stop],
            None if self.ood is None else self.ood[start:stop],
        )

    @staticmethod
    def concat(parts: Sequence[ModelOutputs]) -> ModelOutputs:
        """The outputs of consecutive runs of pairs, joined in order."""
        ood = [p.ood for p in parts]
        return ModelOutputs(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.pooled for p in parts]),
            np.concatenate([p.truncated for p in parts]),
            np.concatenate([p.n_tokens for p in parts]),
            None if any(o is None for o in ood) else np.concatenate([o for o in ood if o is not None]),
        )


@dataclass(frozen=True)
class BatchPlan:
    """One chunk of pairs made ready for onnxruntime: ``batches`` of (pair indices, feeds)."""

    lengths: NDArray[np.int64]  # (N,) tokens per pair after truncation
    truncated: NDArray[np.bool_]  # (N,)
    batches: list[tuple[NDArray[np.intp], dict[str, NDArray[np.int64]]]]


def batch_bounds(sorted_lengths: Sequence[int], batch_size: int, run_cost: float) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting pairs sorted by length into batches of at most ``batch_size``.

    Every batch is padded to its longest pair, so a batch also ends before a longer pair when
    padding its rows up to that length would cost more padded tokens than ``run_cost`` (one more
    run); the pairs after the cut start the next batch at their own length.
    """
    bounds: list[tuple[int, int]] = []
    start, width = 0, 0
    for j, length in enumerate(sorted_lengths):
        rows = j - start
        if rows == batch_size or (rows and run_cost > 0 and rows * (length - width) > run_cost):
            bounds.append((start, j))
            start = j
        width = length
    if len(sorted_lengths):
        bounds.append((start, len(sorted_lengths)))
    return bounds


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
            self.session = config.create_session(model_path)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self.encoder = PairEncoder(tokenizer_path, max_length)
        self.tokenizer = self.encoder.tokenizer  # truncating at max_length, as the pairs are
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
        # A bundle whose export wrote the OOD score into the graph: fetch it from the same pass.
        self.has_ood_output = OOD_OUTPUT in outputs
        if self.has_ood_output:
            self.output_names.append(OOD_OUTPUT)
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
                np.zeros(0, np.float32) if self.has_ood_output else None,
            )
        if n <= CHUNK_PAIRS:
            return self._run_chunk(queries, items)
        # Long calls go chunk by chunk, so tokenizer encodings and padded batches of only one
        # chunk are alive at a time: peak memory stays flat however many pairs arrive.
        return ModelOutputs.concat(
            [
                self._run_chunk(queries[start : start + CHUNK_PAIRS], items[start : start + CHUNK_PAIRS])
                for start in range(0, n, CHUNK_PAIRS)
            ]
        )

    def plan(self, queries: Sequence[str], items: Sequence[str]) -> BatchPlan:
        """Everything before onnxruntime for one chunk: cap, tokenise, sort by length, pad per batch."""
        cap = self._char_cap
        over = [len(q) > cap or len(t) > cap for q, t in zip(queries, items, strict=True)]
        cut = np.array(over, bool) if any(over) else None  # no array to merge when nothing was cut
        if cut is not None:
            queries = [q[:cap] for q in queries]
            items = [t[:cap] for t in items]
        rows = self.encoder.encode(queries, items)
        lengths = rows.lengths
        order = np.argsort(lengths, kind="stable")
        batches = []
        for start, stop in batch_bounds(lengths[order].tolist(), self.batch_size, RUN_COST_TOKENS):
            index = order[start:stop]
            batches.append((index, self._feeds(rows, index)))
        return BatchPlan(lengths, rows.truncated if cut is None else cut | rows.truncated, batches)

    def _run_chunk(self, queries: Sequence[str], items: Sequence[str]) -> ModelOutputs:
        return self.run_plan(self.plan(queries, items))

    def run_plan(self, plan: BatchPlan) -> ModelOutputs:
        """Run a :meth:`plan`'s batches through onnxruntime; outputs in the plan's input order."""
        n = len(plan.lengths)
        logits: NDArray[np.float32] | None = None
        pooled: NDArray[np.float32] | None = None
        ood = np.empty(n, np.float32) if self.has_ood_output else None
        for index, feeds in plan.batches:
            batch = self.session.run(self.output_names, feeds)
            if logits is None or pooled is None:
                logits = np.empty((n, batch[0].shape[1]), np.float32)
                pooled = np.empty((n, batch[1].shape[1]), np.float32)
            logits[index] = batch[0]
            pooled[index] = batch[1]
            if ood is not None:
                ood[index] = batch[2]
        assert logits is not None and pooled is not None  # n > 0 guarantees one batch
        return ModelOutputs(logits, pooled, plan.truncated, plan.lengths, ood)

    def _feeds(self, rows: TokenRows, index: NDArray[np.intp]) -> dict[str, NDArray[np.int64]]:
        """Right-padded id, mask and type arrays for the pairs ``index``: each padded in Python, one
        numpy call per array. A call's feeds are built right after the previous call's onnxruntime
        run has evicted numpy's working set, where each numpy call costs several times its idle
        price: for one pair this takes 51-73 us there against 126-148 us for a length-mask fill
        (ten numpy calls), and on a full batch of 32 it is as fast cold and 30 us slower warm
        (docs/benchmarks.md, "Tenth session")."""
        picked = index.tolist()
        ids = [rows.ids[i] for i in picked]
        width = max(map(len, ids))
        pad = self.pad_id
        arrays = {
            "input_ids": np.array([row + [pad] * (width - len(row)) for row in ids], np.int64),
            "attention_mask": np.array([[1] * len(row) + [0] * (width - len(row)) for row in ids], np.int64),
        }
        if "token_type_ids" in self.input_names:
            types = (rows.type_ids[i] for i in picked)
            arrays["token_type_ids"] = np.array([row + [0] * (width - len(row)) for row in types], np.int64)
        return {name: arrays[name] for name in self.input_names}
