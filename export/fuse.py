"""Fuse the fp32 encoder graph into onnxruntime's attention kernels before int8 quantization.

Why: on 14-token search pairs most of a MiniLM pass is not matrix products but the small ops
around them: per layer four Transposes, a Softmax over 14-wide rows, the mask arithmetic. One
``Attention`` node (``QAttention`` once quantized) does all of it in one kernel, including the Q/K/V
projection as a single int8 GEMM. Measured on the benchmark CPU at 2 threads, 100 items per query
(``python -m bench.graph_levers``): 1.11x faster than the plain int8 graph in the same session, and
1.28x against the plain graph with every onnxruntime rewrite (the runtime before).

Which fusions, and why each of the others is off (same measurement):

* ``SkipLayerNormalization`` off: onnxruntime 1.32's fused kernel cost about nine times a plain
  ``LayerNormalization`` plus ``Add``; with it on, the fused graph was *slower* than the unfused one.
  The runtime also skips onnxruntime's own ``SkipLayerNormFusion``
  (:attr:`darl_lite.inference.SessionConfig.disabled_optimizers`).
* ``BiasGelu`` off: about 5% slower than ``Add`` + ``Gelu`` (a separate trial on the same request).
* ``EmbedLayerNormalization`` off: no faster, and int8 argmax agreement with fp32 was higher without it.

The fused graph must give the fp32 graph's logits (the caller checks on real pairs, see
``darl_lite.export.build``); graphs the optimizer does not know are left as they are. The fused
``Attention`` reads the attention mask as one length per row (onnxruntime's default for BERT), so
inputs must be right-padded, as the runtime's batches are (and as absolute position embeddings need
anyway). The raw-mask format measured the same speed and gave identical logits on 2,000 dev pairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darl_lite.errors import InputError, MissingExtraError

logger = logging.getLogger(__name__)

#: Hugging Face ``model_type`` values whose encoder onnxruntime's ``bert`` optimizer fuses.
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"})
#: Fusion switches (onnxruntime.transformers FusionOptions attributes) and their values; see above.
FUSION_SWITCHES: dict[str, bool] = {
    "enable_attention": True,
    "enable_skip_layer_norm": False,
    "enable_bias_skip_layer_norm": False,
    "enable_bias_gelu": False,
    "enable_gelu": False,
    "enable_embed_layer_norm": False,
}


@dataclass(frozen=True)
class FusionInfo:
    """What :func:`fuse_attention` did (``to_dict()`` is JSON-ready for the manifest)."""

    applied: bool
    reason: str
    fused_ops: dict[str, int] = field(default_factory=dict)
    switches: dict[str, bool] = field(default_factory=dict)
    #: largest |fused - unfused| fp32 logit on the check pairs, filled in by the caller
    max_abs_diff_logits: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fuse_attention(
    fp32_path: str | os.PathLike[str],
    fused_path: str | os.PathLike[str],
    *,
    model_type: str,
    num_heads: int,
    hidden_size: int,
    switches: Mapping[str, bool] | None = None,
) -> FusionInfo:
    """Write ``fp32_path`` with its attention blocks fused to ``fused_path``.

    ``switches`` overrides :data:`FUSION_SWITCHES` (the benchmarks use it to measure the others).

    Returns ``applied=False`` (and writes nothing) for a model type the optimizer does not know or
    a graph in which it found no attention block to fuse; the caller then quantizes the unfused graph.
    """
    if model_type not in BERT_LIKE:
        return FusionInfo(False, f"model_type {model_type!r} is not a BERT-like encoder the optimizer fuses")
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:  # onnxruntime.transformers needs onnx (export extra)
        raise MissingExtraError.for_module(exc.name or "onnx", "export") from exc

    chosen = dict(FUSION_SWITCHES if switches is None else switches)
    options = FusionOptions("bert")
    for name, value in chosen.items():
        if not hasattr(options, name):
            raise InputError(
                f"{name!r} is not a fusion switch of onnxruntime.transformers FusionOptions; "
                f"known here: {sorted(FUSION_SWITCHES)} (see FusionOptions for the rest)"
            )
        setattr(options, name, value)
    # opt_level=0: only the python fusions; onnxruntime's own rewrites run at load time on each node,
    # so the file stays portable across CPUs.
    optimized = optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    fused_ops = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    if not (fused_ops.get("Attention") or fused_ops.get("MultiHeadAttention")):
        return FusionInfo(False, "the optimizer found no attention block to fuse", fused_ops, chosen)
    Path(fused_path).parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(fused_path))
    logger.info("fused %s -> %s: %s", fp32_path, fused_path, fused_ops)
    return FusionInfo(True, "attention fused for onnxruntime's CPU kernels", fused_ops, chosen)
