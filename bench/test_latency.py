"""Latency of the runtime against the raw onnxruntime session, same bundle, same pairs, same threads.

    pytest bench --benchmark-only --benchmark-columns=median,ops,rounds

The raw session runs the int8 graph on pre-tokenised, pre-padded inputs: the floor for this model.
The runtime's overhead (tokenising, bucketing, OOD score, routing, result objects) is the gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from darl_lite import Scorer, SessionConfig
from darl_lite.bundle import load_bundle, model_role
from darl_lite.inference import RelevanceModel

SIZES = [1, 10, 100]
THREADS = [1, 2]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("n_items", SIZES)
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_runtime_score(
    benchmark, bundle_dir: Path, query_items, precision: str, n_items: int, threads: int
) -> None:
    scorer = Scorer.load(bundle_dir, precision=precision, session=SessionConfig(intra_op_threads=threads))
    query, items = query_items[n_items]
    results = benchmark(scorer.score, query, items)
    assert len(results) == n_items
    benchmark.extra_info["pairs"] = n_items


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("n_items", SIZES)
def test_raw_session_int8(benchmark, bundle_dir: Path, query_items, n_items: int, threads: int) -> None:
    bundle = load_bundle(bundle_dir)
    model = RelevanceModel(
        bundle.path_of(model_role("int8")),
        bundle.path_of("tokenizer"),
        max_length=bundle.max_length,
        session=SessionConfig(intra_op_threads=threads),
    )
    query, items = query_items[n_items]
    encodings = model.tokenizer.encode_batch([(query, item) for item in items])
    width = max(len(e.ids) for e in encodings)
    feeds = model._feeds(encodings, width)  # pre-tokenised, padded once
    options = SessionConfig(intra_op_threads=threads).session_options()
    session = ort.InferenceSession(
        str(bundle.path_of(model_role("int8"))), options, providers=["CPUExecutionProvider"]
    )
    logits, _ = benchmark(session.run, ["logits", "pooled"], feeds)
    assert np.asarray(logits).shape[0] == n_items
    benchmark.extra_info["pairs"] = n_items
