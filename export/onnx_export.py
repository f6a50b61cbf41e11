"""Export a Hugging Face sequence-classification model to one ONNX graph with two outputs.

The graph takes exactly the tensors the tokenizer produces (``input_ids``, ``attention_mask`` and,
where the model reads them, ``token_type_ids``; int64, dynamic batch and sequence axes) and returns

* ``logits`` ``(batch, n_grades)``: what the classification head computes, and
* ``pooled`` ``(batch, hidden)``: the vector that head reads (for BERT the pooler output, for a
  decoder with a ``score`` head the hidden state of the last non-padding token).

``pooled`` is exported beside the logits so that the runtime's OOD detector and any later head can
work on the same representation without a second model. It is captured generically with a forward
pre-hook on the head module, so no model-specific code path is needed.

Two exporters are supported. optimum's ONNX exporter is tried first, because it knows how to trace
each architecture (it patches the masking and cache code of recent transformers releases so that
TorchScript can trace them); we extend its text-classification config with the ``pooled`` output.
When optimum is not installed or does not know the architecture we fall back to
``torch.onnx.export(dynamo=False)``, the TorchScript exporter: the dynamo exporter needs
``onnxscript``, which is not one of our dependencies. Either way the file is checked with
``onnx.checker`` and then run once in onnxruntime against torch on a padded batch of varied lengths,
so a graph that loads but computes something else is refused at export time, not in production.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from darl_lite.errors import InputError, MissingExtraError
from darl_lite.export.heads import capture_head_input, head_of, pool_head_input

if TYPE_CHECKING:  # type-only: keeps `import darl_lite.export` cheap and torch-free at import time
    import torch

logger = logging.getLogger(__name__)

Exporter = Literal["auto", "optimum", "torch"]

OUTPUT_NAMES: tuple[str, str] = ("logits", "pooled")
#: Largest |ONNX − torch| accepted by the export-time check (fp32, same inputs).
EXPORT_ATOL = 1e-4

_SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("who wrote the hobbit", "The Hobbit, a 1937 children's fantasy novel by J. R. R. Tolkien"),
    ("paris", "Paris"),
    ("rivers in europe longer than the rhine", "Danube, the second-longest river in Europe"),
)


@dataclass(frozen=True)
class OnnxExportInfo:
    """What :func:`export_onnx` wrote, in plain Python values (``to_dict()`` is JSON-ready)."""

    path: str
    exporter: str  # "optimum" or "torch.onnx"
    exporter_version: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    n_grades: int
    hidden_size: int
    head_module: str
    max_abs_diff_logits: float
    max_abs_diff_pooled: float
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError.for_module(module, "export") from exc


def _input_names(model: Any, tokenizer: Any) -> list[str]:
    """The tokenizer's outputs that the model's forward accepts, in the tokenizer's order."""
    produced = list(getattr(tokenizer, "model_input_names", []) or [])
    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in produced if n in accepted]
    for required in ("input_ids", "attention_mask"):
        if required not in names:
            raise InputError(
                f"the tokenizer produces {produced} and the model accepts {sorted(accepted)}; "
                f"both must include {required!r}. Pass the tokenizer saved with this model."
            )
    return names


def _make_wrapper(model: Any, head_name: str, head: Any, names: Sequence[str]) -> Any:
    import torch

    pad_token_id = getattr(model.config, "pad_token_id", None)

    class LogitsAndPooled(torch.nn.Module):
        """``(inputs…) -> (logits, pooled)``: positional inputs in ``names`` order, for tracing."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kwargs = dict(zip(names, tensors, strict=True))
            with capture_head_input(head) as captured:
                out = self.model(**kwargs, return_dict=True)
            return out.logits, pool_head_input(
                captured["hidden"], kwargs["input_ids"], head_name, pad_token_id
            )

    return LogitsAndPooled().eval()


def _sample_batch(tokenizer: Any, names: Sequence[str]) -> dict[str, Any]:
    """A padded batch of varied lengths (right padding, as the tokenizer is configured)."""
    queries = [q for q, _ in _SAMPLE_PAIRS]
    items = [t for _, t in _SAMPLE_PAIRS]
    if getattr(tokenizer, "pad_token", None) is None:
        raise InputError(
            "the tokenizer has no pad token, so batches cannot be padded; set one first "
            "(tokenizer.pad_token = tokenizer.eos_token) and model.config.pad_token_id to match"
        )
    encoded = tokenizer(queries, items, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {n: encoded[n].long() for n in names}


def _export_torch(wrapper: Any, batch: dict[str, Any], names: Sequence[str], path: Path, opset: int) -> None:
    import torch

    dynamic_axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    dynamic_axes.update({"logits": {0: "batch_size"}, "pooled": {0: "batch_size"}})
    torch.onnx.export(
        wrapper,
        tuple(batch[n] for n in names),
        str(path),
        input_names=list(names),
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def _export_optimum(
    model: Any, head_name: str, head: Any, names: Sequence[str], path: Path, opset: int
) -> None:
    """Export through optimum, with its text-classification config extended by a ``pooled`` output.

    Raises ``LookupError`` when optimum cannot serve this model, which the caller turns into a
    fallback to the torch exporter.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills TasksManager's registry)
    from optimum.exporters.onnx import export as optimum_export
    from optimum.exporters.tasks import TasksManager

    model_type = getattr(model.config, "model_type", None)
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task="text-classification", library_name="transformers"
        )
    except (KeyError, ValueError) as exc:
        raise LookupError(f"optimum has no text-classification config for {model_type!r}: {exc}") from exc
    base_cls = type(constructor(model.config))
    base_patcher = base_cls._MODEL_PATCHER
    pad_token_id = getattr(model.config, "pad_token_id", None)

    class PooledPatcher(base_patcher):  # type: ignore[misc, valid-type]
        """optimum's patcher, plus the head input captured and returned as ``pooled``."""

        def __enter__(self) -> None:
            super().__enter__()
            patched = getattr(self._model, self.orig_forward_name)

            @functools.wraps(patched)  # optimum checks the dummy inputs against this signature
            def forward(*args: Any, **kwargs: Any) -> Any:
                with capture_head_input(head) as captured:
                    outputs = patched(*args, **kwargs)
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                outputs["pooled"] = pool_head_input(captured["hidden"], input_ids, head_name, pad_token_id)
                return outputs

            setattr(self._model, self.orig_forward_name, forward)

    class PooledConfig(base_cls):  # type: ignore[misc, valid-type]
        _MODEL_PATCHER = PooledPatcher

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {k: v for k, v in super().inputs.items() if k in names}

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"logits": {0: "batch_size"}, "pooled": {0: "batch_size"}}

    config = PooledConfig(model.config, task="text-classification")
    offered = list(config.inputs)
    if sorted(offered) != sorted(names):
        raise LookupError(f"optimum's {model_type!r} config feeds {offered}; the tokenizer makes {names}")
    optimum_export(model=model, config=config, output=path, opset=opset)


def _reorder_inputs(path: Path, names: Sequence[str]) -> None:
    """Put the graph inputs in tokenizer order (optimum orders them by the forward signature)."""
    import onnx

    proto = onnx.load(str(path))
    by_name = {i.name: i for i in proto.graph.input}
    if [i.name for i in proto.graph.input] == list(names):
        return
    ordered = [by_name[n] for n in names]
    del proto.graph.input[:]
    proto.graph.input.extend(ordered)
    onnx.save(proto, str(path))


def _verify(path: Path, wrapper: Any, batch: dict[str, Any], names: Sequence[str]) -> tuple[float, float]:
    """Check the file structurally, then numerically against torch; return the max |diff| per output."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    got_inputs = [i.name for i in proto.graph.input]
    got_outputs = [o.name for o in proto.graph.output]
    if got_inputs != list(names) or got_outputs != list(OUTPUT_NAMES):
        raise RuntimeError(
            f"exported graph has inputs {got_inputs} and outputs {got_outputs}; expected {list(names)} "
            f"and {list(OUTPUT_NAMES)}. This is a bug in darl_lite.export; please report it."
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: batch[n].numpy().astype(np.int64) for n in names}
    onnx_logits, onnx_pooled = session.run(list(OUTPUT_NAMES), feed)
    with torch.no_grad():
        ref_logits, ref_pooled = wrapper(*(batch[n] for n in names))
    diff_logits = float(np.max(np.abs(onnx_logits - ref_logits.numpy())))
    diff_pooled = float(np.max(np.abs(onnx_pooled - ref_pooled.numpy())))
    if not (diff_logits <= EXPORT_ATOL and diff_pooled <= EXPORT_ATOL):
        raise RuntimeError(
            f"exported graph disagrees with torch on a padded sample batch: max |Δlogits| = "
            f"{diff_logits:.2e}, max |Δpooled| = {diff_pooled:.2e}, expected ≤ {EXPORT_ATOL:.0e}. "
            "Try exporter='torch' or another opset; if it persists, report the model type."
        )
    return diff_logits, diff_pooled


def export_onnx(
    model: Any,
    tokenizer: Any,
    out_path: str | os.PathLike[str],
    *,
    opset: int = 17,
    exporter: Exporter = "auto",
) -> OnnxExportInfo:
    """Export ``model`` to ``out_path`` as one fp32 ONNX graph returning ``logits`` and ``pooled``.

    ``model`` is a transformers ``*ForSequenceClassification`` (encoder like BERT/MiniLM, or a
    decoder with a ``score`` head such as Qwen2, whose ``config.pad_token_id`` must be set);
    ``tokenizer`` is its tokenizer, which decides the graph inputs. ``exporter="auto"`` tries optimum
    and falls back to ``torch.onnx`` (recorded in :attr:`OnnxExportInfo.fallback_reason`);
    ``"optimum"`` or ``"torch"`` force one. The model is put in eval mode (it stays there) and the
    export runs without gradients. Raises :class:`InputError` for a model or tokenizer it cannot
    export, and ``RuntimeError`` if no exporter can trace it or the written graph does not reproduce
    torch within 1e-4. Note that optimum sets ``model.config.return_dict = True`` (and ``use_cache``
    off) on the model it exports; pass a copy if that matters to the caller.
    """
    if exporter not in ("auto", "optimum", "torch"):
        raise InputError(f"exporter must be 'auto', 'optimum' or 'torch', not {exporter!r}")
    if not isinstance(opset, int) or opset < 14:
        raise InputError(f"opset must be an int ≥ 14 (scaled_dot_product_attention needs it), not {opset!r}")
    torch = _require("torch")
    _require("onnx")

    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head_name, head = head_of(model)
    names = _input_names(model, tokenizer)
    model.eval()
    batch = _sample_batch(tokenizer, names)
    wrapper = _make_wrapper(model, head_name, head, names)
    with torch.no_grad():
        logits, pooled = wrapper(*(batch[n] for n in names))

    used, version, fallback = _export_graph(model, wrapper, batch, names, path, opset, exporter)
    diff_logits, diff_pooled = _verify(path, wrapper, batch, names)
    info = OnnxExportInfo(
        path=str(path),
        exporter=used,
        exporter_version=version,
        opset=opset,
        input_names=list(names),
        output_names=list(OUTPUT_NAMES),
        n_grades=int(logits.shape[-1]),
        hidden_size=int(pooled.shape[-1]),
        head_module=head_name,
        max_abs_diff_logits=diff_logits,
        max_abs_diff_pooled=diff_pooled,
        fallback_reason=fallback,
    )
    logger.info(
        "exported %s with %s (opset %d): inputs %s, max |Δlogits| %.1e",
        path,
        used,
        opset,
        names,
        diff_logits,
    )
    return info


def _export_graph(
    model: Any,
    wrapper: Any,
    batch: dict[str, Any],
    names: Sequence[str],
    path: Path,
    opset: int,
    exporter: Exporter,
) -> tuple[str, str, str | None]:
    """Write ``path`` with optimum (unless ``exporter="torch"``), else torch.onnx.

    Returns ``(exporter used, its version, why optimum was not used or None)``.
    """
    torch = _require("torch")
    used, version, fallback = "torch.onnx", torch.__version__, None
    with torch.no_grad():
        if exporter in ("auto", "optimum"):
            optimum_version, fallback = _try_optimum(model, names, path, opset, exporter)
            if optimum_version is not None:
                used, version = "optimum", optimum_version
        if used == "torch.onnx":
            try:
                _export_torch(wrapper, batch, names, path, opset)
            except Exception as exc:
                reason = f" (after optimum: {fallback})" if fallback else ""
                raise RuntimeError(
                    f"torch.onnx could not export {type(model).__name__}{reason}: {type(exc).__name__}: "
                    f"{exc}. Decoders usually need optimum (pip install 'darl-lite[export]')"
                ) from exc
    return used, version, fallback


def _try_optimum(
    model: Any, names: Sequence[str], path: Path, opset: int, exporter: Exporter
) -> tuple[str | None, str | None]:
    """``(optimum-onnx's version, None)`` once optimum wrote ``path``, else ``(None, why not)``.

    With ``exporter="optimum"`` a failure raises instead: nothing falls back.
    """
    head_name, head = head_of(model)
    try:
        _require("optimum.exporters.onnx")
        _export_optimum(model, head_name, head, names, path, opset)
        _reorder_inputs(path, names)
        from importlib import metadata

        return metadata.version("optimum-onnx"), None
    except (MissingExtraError, LookupError) as exc:
        if exporter == "optimum":
            raise InputError(f"optimum cannot export this model: {exc}") from exc
        logger.info("optimum cannot export %s (%s); using torch.onnx", type(model).__name__, exc)
        return None, str(exc)
    except Exception as exc:  # an optimum tracing failure: the torch path may still work
        if exporter == "optimum":
            raise
        logger.warning("optimum export of %s failed (%s); trying torch.onnx", type(model).__name__, exc)
        return None, f"optimum failed: {type(exc).__name__}: {exc}"
