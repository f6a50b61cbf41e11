"""Shared pieces of the benchmark suites: the real requests, the thread budget, the contenders, FLOPs.

Every contender gets the same student weights, the same real pairs, the same batch size (32, pairs
sorted by length) and the same thread budget: onnxruntime intra-op threads, ``torch.set_num_threads``,
and, because the suites run in one process per budget (``bench.run``), the Rust tokenizers' rayon
pool and the BLAS/OpenMP pools through the environment (:func:`thread_env`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Items per query of the latency suites.
SIZES: tuple[int, ...] = (1, 10, 100, 1000)
#: Thread budgets of the latency suites.
THREADS: tuple[int, ...] = (1, 2)
#: The batch size every contender uses (darl-lite's and sentence-transformers' default).
BATCH_SIZE = 32

#: Contender name → (label, precision of its GEMMs).
CONTENDERS: dict[str, tuple[str, str]] = {
    "darl_int8": ("darl-lite runtime int8", "int8"),
    "darl_fp32": ("darl-lite runtime fp32", "fp32"),
    "raw_int8": ("raw onnxruntime session, int8 graph, pre-tokenised (floor)", "int8"),
    "st_torch": ("sentence-transformers CrossEncoder, torch fp32", "fp32"),
    "st_onnx": ("sentence-transformers CrossEncoder, ONNX backend fp32", "fp32"),
    "st_onnx_int8": ("sentence-transformers CrossEncoder, ONNX dynamic-quantized (its CPU's preset)", "int8"),
}

ST_ONNX_FILE = "onnx/model.onnx"


@lru_cache(maxsize=1)
def st_int8_preset() -> str:
    """sentence-transformers' dynamic int8 preset a user of this CPU picks: the fastest it has here.

    ``avx512_vnni`` where the CPU has VNNI, ``avx512`` with AVX-512 alone, ``arm64`` on ARM, else
    ``avx2``. The VNNI preset on an AVX2-only CPU would run, but on a preset made for another CPU.
    """
    import platform

    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    from bench.peak import read_cpu_info

    flags = read_cpu_info().flags
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def _st_int8_path(st_dir: Path) -> Path | None:
    """ST's int8 export for this CPU's preset in ``st_dir``, if there (``avx2`` writes ``quint8``
    weights: ``onnx/model_quint8_avx2.onnx``; the others ``onnx/model_qint8_<preset>.onnx``)."""
    return next(iter(sorted(st_dir.glob(f"onnx/model_*int8_{st_int8_preset()}.onnx"))), None)


def st_int8_file(st_dir: Path) -> str:
    """The file ST's ``export_dynamic_quantized_onnx_model(model, st_int8_preset())`` wrote in
    ``st_dir``, relative to it."""
    found = _st_int8_path(st_dir)
    if found is None:
        raise FileNotFoundError(
            f"no sentence-transformers {st_int8_preset()} int8 export in {st_dir / 'onnx'}; "
            "bench.common.prepare_st_models makes it"
        )
    return found.relative_to(st_dir).as_posix()


def st_int8_label() -> str:
    return f"ST int8 export ({st_int8_preset()})"


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def thread_env(threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process held to ``threads`` (None: leave the pools alone)."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        for name in THREAD_ENV_VARS:
            env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "true"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def python() -> str:
    return sys.executable


# --------------------------------------------------------------------------------------------------
# Real requests


@lru_cache(maxsize=1)
def latency_requests(sizes: tuple[int, ...] = SIZES) -> dict[int, tuple[str, list[str]]]:
    """For each size n: the id_test query with the most judged items, and n real id_test items
    (its own first, then the other queries' items in file order; distinct texts, no cycling)."""
    from darl_lite.datasets import load_dbpedia

    pairs = list(load_dbpedia(fold=0).id_test)
    by_query: dict[str, list[str]] = {}
    for p in pairs:
        by_query.setdefault(p.query, []).append(p.item)
    query = max(by_query, key=lambda q: len(by_query[q]))
    items: list[str] = []
    seen: set[str] = set()
    for item in [*by_query[query], *(p.item for p in pairs)]:
        if item not in seen:
            seen.add(item)
            items.append(item)
    if len(items) < max(sizes):
        raise RuntimeError(f"id_test has only {len(items)} distinct items, need {max(sizes)}")
    return {n: (query, items[:n]) for n in sizes}


# --------------------------------------------------------------------------------------------------
# sentence-transformers models, exported once into a writable copy of the student


def prepare_st_models(student: Path, work: Path, max_length: int) -> Path:
    """A writable copy of ``student`` with ST's ONNX export and its dynamic-quantized export in ``onnx/``."""
    target = work / "st_student"
    # The copy is reused only for the same student weights: a stale copy would compare ST on
    # another model (same shapes, so only the quality rows and the same-weights check would show it).
    source = hashlib.sha256((student / "model.safetensors").read_bytes()).hexdigest()
    marker = target / "darl_source_sha256.txt"
    if (
        (target / ST_ONNX_FILE).is_file()
        and _st_int8_path(target) is not None
        and marker.is_file()
        and marker.read_text().strip() == source
    ):
        return target
    import logging

    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(student, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    model = CrossEncoder(str(target), backend="onnx", device="cpu", max_length=max_length)
    model.save_pretrained(str(target))
    export_dynamic_quantized_onnx_model(model, st_int8_preset(), str(target))
    st_int8_file(target)  # it wrote the file under the name looked for
    marker.write_text(source + "\n")
    return target


# --------------------------------------------------------------------------------------------------
# Contenders: prepare(query, items) -> a zero-argument call that scores the request


Call = Callable[[], Any]


@dataclass
class ContenderFactory:
    """Builds each contender once per thread budget and returns request-bound calls."""

    bundle: Path
    st_dir: Path | None
    max_length: int = 64

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, int], Any] = {}

    def prepare(self, name: str, threads: int, query: str, items: list[str]) -> Call:
        if name.startswith("st_"):
            import torch

            torch.set_num_threads(threads)
        model = self._model(name, threads)
        if name.startswith("darl_"):
            return lambda: model.score(query, items)
        if name == "raw_int8":
            return _raw_call(model, query, items)
        pairs = [(query, item) for item in items]
        return lambda: model.predict(
            pairs, batch_size=BATCH_SIZE, apply_softmax=True, show_progress_bar=False
        )

    def _model(self, name: str, threads: int) -> Any:
        key = (name, threads)
        if key not in self._cache:
            self._cache[key] = self._build(name, threads)
        return self._cache[key]

    def _build(self, name: str, threads: int) -> Any:
        from darl_lite import Scorer, SessionConfig

        session = SessionConfig(intra_op_threads=threads)
        if name == "darl_int8":
            return Scorer.load(self.bundle, precision="int8", session=session, batch_size=BATCH_SIZE)
        if name == "darl_fp32":
            return Scorer.load(self.bundle, precision="fp32", session=session, batch_size=BATCH_SIZE)
        if name == "raw_int8":
            return RawSession(self.bundle, threads)
        if self.st_dir is None:
            raise RuntimeError("sentence-transformers contenders need --student (DARL_BENCH_ST_DIR)")
        from sentence_transformers import CrossEncoder

        if name == "st_torch":
            return CrossEncoder(str(self.st_dir), device="cpu", max_length=self.max_length)
        file_name = ST_ONNX_FILE if name == "st_onnx" else st_int8_file(self.st_dir)
        return CrossEncoder(
            str(self.st_dir),
            backend="onnx",
            device="cpu",
            max_length=self.max_length,
            model_kwargs={
                "file_name": file_name,
                "provider": "CPUExecutionProvider",
                "session_options": session.session_options(),
            },
        )


class RawSession:
    """The int8 graph in a bare onnxruntime session plus the bundle's tokenizer (used only to prepare)."""

    def __init__(self, bundle_dir: Path, threads: int) -> None:
        from darl_lite import SessionConfig
        from darl_lite.bundle import load_bundle, model_role
        from darl_lite.inference import RelevanceModel

        bundle = load_bundle(bundle_dir)
        config = SessionConfig(intra_op_threads=threads)
        self.helper = RelevanceModel(
            bundle.path_of(model_role("int8")),
            bundle.path_of("tokenizer"),
            max_length=bundle.max_length,
            session=config,
        )
        # The runtime's own session (threads, disabled rewrites): the floor is the same graph in the
        # same kind of session, minus everything around it.
        self.session = self.helper.session
        self.output_names = self.helper.output_names

    def batches(self, query: str, items: list[str]) -> list[dict[str, Any]]:
        """The runtime's own batch plan (sorted by token length, 32 a batch, padded per batch), prebuilt."""
        return [feeds for _, feeds in self.helper.plan([query] * len(items), items).batches]


def _raw_call(raw: RawSession, query: str, items: list[str]) -> Call:
    feeds = raw.batches(query, items)
    run, names = raw.session.run, raw.output_names

    def call() -> list[Any]:
        return [run(names, f) for f in feeds]

    return call


# --------------------------------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True)
class EncoderShape:
    layers: int = 6
    hidden: int = 384
    ffn: int = 1536
    n_labels: int = 3

    @classmethod
    def from_config(cls, config_json: Path) -> EncoderShape:
        c = json.loads(config_json.read_text())
        return cls(
            layers=int(c["num_hidden_layers"]),
            hidden=int(c["hidden_size"]),
            ffn=int(c["intermediate_size"]),
            n_labels=len(c.get("id2label", {})) or 3,
        )

    def flops(self, tokens: float) -> float:
        """Multiply-adds × 2 of one pair of ``tokens`` tokens through the encoder, pooler and head.

        Per layer: Q, K, V, O projections ``4·2·L·d²``; attention scores and weighted sum
        ``2·2·L²·d``; feed-forward ``2·2·L·d·f``. Pooler ``2·d²``, head ``2·d·c``. Embedding look-ups,
        layer norms, softmax and GELU are not counted (they are not GEMMs).
        """
        L, d, f = float(tokens), self.hidden, self.ffn
        per_layer = 8 * L * d * d + 4 * L * L * d + 4 * L * d * f
        return self.layers * per_layer + 2 * d * d + 2 * d * self.n_labels

    def flops_first_token(self, tokens: float) -> float:
        """:meth:`flops` of a graph whose last layer runs its output projection and feed-forward
        block on the first token only (``darl_lite.export.first_token``): the head reads no other row."""
        L, d, f = float(tokens), self.hidden, self.ffn
        return self.flops(tokens) - (L - 1) * (2 * d * d + 4 * d * f)


def int8_first_token(manifest: dict) -> bool:
    """Whether the bundle's int8 graph runs its last layer on the first token only
    (``darl_lite.export.first_token``), as its manifest records."""
    return bool(manifest.get("model", {}).get("first_token", {}).get("applied"))


def token_stats(bundle: Path, requests: dict[int, tuple[str, list[str]]], shape: EncoderShape) -> dict:
    """Per size: mean tokens per pair, useful GFLOPs per request (actual lengths), the GFLOPs the
    bundle's int8 graph does at actual lengths (fewer where its last layer runs on the first token
    only: the % of peak of the contenders that run it rests on this), and executed GFLOPs (batches
    of ``BATCH_SIZE``, each padded to its longest pair)."""
    import numpy as np
    from tokenizers import Tokenizer

    from darl_lite.bundle import load_bundle

    b = load_bundle(bundle, verify=False)
    int8_flops = shape.flops_first_token if int8_first_token(b.manifest) else shape.flops
    tok = Tokenizer.from_file(str(b.path_of("tokenizer")))
    tok.no_padding()
    tok.enable_truncation(b.max_length, strategy="longest_first")
    out = {}
    for n, (query, items) in requests.items():
        lengths = np.asarray([len(e.ids) for e in tok.encode_batch([(query, i) for i in items])])
        ordered = np.sort(lengths)
        executed = sum(
            len(ordered[s : s + BATCH_SIZE]) * shape.flops(ordered[s : s + BATCH_SIZE].max())
            for s in range(0, n, BATCH_SIZE)
        )
        out[str(n)] = {
            "mean_tokens": float(lengths.mean()),
            "max_tokens": int(lengths.max()),
            "useful_gflop": float(sum(shape.flops(x) for x in lengths) / 1e9),
            "int8_graph_gflop": float(sum(int8_flops(x) for x in lengths) / 1e9),
            "executed_gflop": float(executed / 1e9),
        }
    return out
