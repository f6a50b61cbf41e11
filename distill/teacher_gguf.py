"""Convert the joined GGUF to a safetensors-only Hugging Face folder with transformers' GGUF loader."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

from darl_lite.distill.teacher_pins import TeacherFetchError
from darl_lite.errors import MissingExtraError

logger = logging.getLogger(__name__)

#: File suffixes that can hold pickles; a converted folder must contain none of them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def convert_gguf(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantise a GGUF with transformers and save model + tokenizer to ``out`` as safetensors only.

    Returns GGUF header facts for the provenance record. Raises :class:`MissingExtraError` without the
    ``gguf`` package.
    """
    require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    tokenizer.save_pretrained(out)
    pickles = sorted(p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TeacherFetchError(f"conversion wrote pickle-capable files {pickles} to {out}; refusing them")
    if not (out / "model.safetensors").is_file():
        raise TeacherFetchError(
            f"conversion did not write one model.safetensors in {out}; got {sorted(os.listdir(out))}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("converted %s in %.1f s (%d parameters)", gguf_path, time.perf_counter() - started, n_params)
    return {"gguf_header": _gguf_header(gguf_path), "parameters": int(n_params), "dtype": str(model.dtype)}


def _gguf_header(path: Path) -> dict[str, Any]:
    """A few identifying GGUF metadata fields (name, architecture, quantisation, sizes)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    keep = (
        "general.name",
        "general.architecture",
        "general.file_type",
        "general.quantization_version",
        "qwen2.block_count",
        "qwen2.embedding_length",
        "qwen2.context_length",
    )
    header: dict[str, Any] = {}
    for key in keep:
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            header[key] = value if isinstance(value, (str, int, float)) else str(value)
    header["tensor_count"] = len(reader.tensors)
    return header


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError.for_module("gguf", "distill")
