"""Dynamic int8 quantization of the exported fp32 graph for CPU search nodes.

We use onnxruntime's *dynamic* quantization: weights are stored as int8, activations are quantized
per batch at run time, so no calibration set is needed and nothing here depends on the data. Weights
are ``QInt8`` (signed, symmetric) and per-channel by default: on the project's AVX2 CPU QInt8
per-channel ran 1.48× faster than fp32 onnxruntime, against 1.23× for QUInt8, and per-channel scales
keep the accuracy of layers whose output channels have very different ranges.

Presets pick ``reduce_range`` by instruction set, because that is where the CPUs differ:

* ``avx2``: int8 GEMM kernels multiply u8 activations by s8 weights with ``vpmaddubsw``, which adds
  pairs of products into int16 and can saturate with full 8-bit weights; 7-bit weights
  (``reduce_range=True``) cannot overflow. This is onnxruntime's own advice for AVX2/AVX512 without VNNI.
* ``avx512_vnni``: ``vpdpbusd`` accumulates in int32, no saturation, so full 8-bit weights.
* ``arm64``: the NEON/``sdot`` kernels accumulate in int32 as well; full 8-bit weights.

The classifier head (the projection to the grades, and the pooler dense that feeds it) is tiny, so
quantizing it saves nothing measurable but moves logits near decision boundaries; ``exclude_nodes=
"auto"`` keeps it in fp32. Beware: before quantizing, onnxruntime's dynamic quantizer rewrites every
``Gemm`` (how BERT's 2-D head is exported) into ``MatMul`` + ``Add`` named ``<gemm>_MatMul`` and
``<gemm>_Add``, and only then applies ``nodes_to_exclude``; excluding a ``Gemm`` by its own name is
silently ignored. We therefore pass both names, and check the written graph: an excluded node that
ended up quantized is an error, not a surprise in production.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from darl_lite.errors import InputError, MissingExtraError

logger = logging.getLogger(__name__)

Preset = Literal["avx2", "avx512_vnni", "arm64"]

#: Node types that hold a weight matrix the head multiplies by.
HEAD_OP_TYPES = frozenset({"MatMul", "Gemm"})
#: Node types onnxruntime writes for a quantized matrix product.
_QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat"}
)
#: Suffix onnxruntime gives the MatMul it makes from a Gemm (onnx_model.replace_gemm_with_matmul).
_GEMM_AS_MATMUL = "_MatMul"
#: Node types walked through between a graph output and the head's projection: shape plumbing and
#: element-wise activations. Anything else (a norm, an attention block) ends the walk.
_PASSTHROUGH_OPS = frozenset(
    {
        "Add",
        "Tanh",
        "Relu",
        "Gelu",
        "Sigmoid",
        "Identity",
        "Dropout",
        "Cast",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Transpose",
        "Slice",
        "Gather",
        "GatherND",
        "GatherElements",
    }
)
#: Graph outputs the walk starts from (see darl_lite.export.onnx_export.OUTPUT_NAMES).
_HEAD_OUTPUTS = ("logits", "pooled")


@dataclass(frozen=True)
class QuantPreset:
    """quantize_dynamic options for one CPU family; see the module docstring for the reasoning."""

    name: str
    reduce_range: bool
    op_types: tuple[str, ...]
    why: str


PRESETS: dict[str, QuantPreset] = {
    "avx2": QuantPreset(
        "avx2", True, ("MatMul", "Gather"), "7-bit weights: vpmaddubsw's int16 pair sums cannot saturate"
    ),
    "avx512_vnni": QuantPreset(
        "avx512_vnni", False, ("MatMul", "Gather"), "vpdpbusd accumulates in int32: full 8-bit weights"
    ),
    "arm64": QuantPreset(
        "arm64", False, ("MatMul", "Gather"), "sdot accumulates in int32: full 8-bit weights"
    ),
}


def detect_preset() -> str:
    """The preset for this machine's CPU: ``arm64``, ``avx512_vnni`` (AVX-512 or AVX VNNI), else ``avx2``.

    Export usually runs on the same fleet as the search nodes; pass a preset explicitly when not.
    """
    import platform

    if platform.machine().lower() in {"aarch64", "arm64"}:
        return "arm64"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return "avx2"
    return "avx512_vnni" if {"avx512_vnni", "avx_vnni"} & set(flags) else "avx2"


@dataclass(frozen=True)
class QuantizationInfo:
    """What :func:`quantize_int8` did, in plain Python values (``to_dict()`` is JSON-ready)."""

    fp32_path: str
    int8_path: str
    preset: str
    per_channel: bool
    reduce_range: bool
    weight_type: str
    op_types: list[str]
    excluded_nodes: list[str]
    fp32_bytes: int
    int8_bytes: int
    onnxruntime_version: str

    @property
    def size_ratio(self) -> float:
        """int8 size / fp32 size."""
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_nodes(model: Any) -> list[str]:
    """Names of the classifier-head MatMul/Gemm nodes of an exported graph (an ``onnx.ModelProto``).

    Walks back from the ``logits`` and ``pooled`` outputs through shape plumbing and element-wise
    activations only, and stops at the first MatMul/Gemm on each path whose weight is an initializer.
    For BERT that finds the classifier projection (from ``logits``) and the pooler dense (from
    ``pooled``); for a decoder ``score`` head it finds the score projection and nothing behind the
    final norm. Returned in graph order.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    missing = [name for name in _HEAD_OUTPUTS if name not in outputs]
    if missing:
        raise InputError(
            f"the graph has outputs {sorted(outputs)}, not {missing}; exclude_nodes='auto' needs a graph "
            "written by darl_lite.export.export_onnx (or pass the node names to exclude yourself)"
        )
    found: set[str] = set()
    seen: set[str] = set()
    stack = list(_HEAD_OUTPUTS)
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in HEAD_OP_TYPES and any(i in initializers for i in node.input[:2]):
            found.add(node.name)
        elif node.op_type in _PASSTHROUGH_OPS:
            stack.extend(i for i in node.input if i)
    return [node.name for node in graph.node if node.name in found]


def _check_excluded_stayed_float(int8_path: Path, excluded: Sequence[str]) -> None:
    """Each excluded node must still be a float Gemm/MatMul in the int8 graph (maybe renamed by ORT)."""
    import onnx

    nodes = onnx.load(str(int8_path), load_external_data=False).graph.node
    ops = {node.name: node.op_type for node in nodes}
    for name in excluded:
        quantized = [n for n, op in ops.items() if op in _QUANTIZED_OPS and n.startswith(name)]
        floating = ops.get(name) in HEAD_OP_TYPES or ops.get(name + _GEMM_AS_MATMUL) == "MatMul"
        if quantized or not floating:
            raise RuntimeError(
                f"node {name!r} was to stay fp32, but the int8 graph {int8_path} has "
                f"{quantized or 'no float MatMul/Gemm of that name'}: this onnxruntime renames nodes "
                "in a way darl_lite.export does not know; quantize with exclude_nodes=None or pin "
                "onnxruntime, and report it"
            )


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    *,
    preset: Preset = "avx2",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] | Literal["auto"] | None = None,
) -> QuantizationInfo:
    """Write a dynamically quantized int8 copy of ``fp32_path`` to ``int8_path``.

    ``exclude_nodes`` is ``None`` (quantize every supported node), ``"auto"`` (keep the classifier
    head in fp32, found by :func:`head_nodes`), or explicit node names, each of which must exist.
    Check the result with :func:`darl_lite.export.parity.parity_report` before shipping it.
    """
    try:
        import onnx
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MissingExtraError.for_module(exc.name or "onnx", "export") from exc

    if preset not in PRESETS:
        raise InputError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
    source, target = Path(fp32_path), Path(int8_path)
    if not source.is_file():
        raise InputError(f"fp32 model {source} does not exist; write it first with export_onnx()")
    if source.resolve() == target.resolve():
        raise InputError(f"int8_path must differ from fp32_path ({source}); the fp32 graph is the reference")
    chosen = PRESETS[preset]
    model = onnx.load(str(source))
    node_names = {node.name for node in model.graph.node}

    if exclude_nodes == "auto":
        excluded = head_nodes(model)
    elif exclude_nodes is None:
        excluded = []
    elif isinstance(exclude_nodes, str):
        raise InputError(f"exclude_nodes must be None, 'auto' or a list of node names, not {exclude_nodes!r}")
    else:
        excluded = list(exclude_nodes)
        unknown = [n for n in excluded if n not in node_names]
        if unknown:
            raise InputError(
                f"exclude_nodes names {unknown} that are not nodes of {source}; "
                f"the head nodes there are {head_nodes(model)}"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        model,
        target,
        op_types_to_quantize=list(chosen.op_types),
        per_channel=per_channel,
        reduce_range=chosen.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[*excluded, *(n + _GEMM_AS_MATMUL for n in excluded)],
        extra_options={"MatMulConstBOnly": True},
    )
    _check_excluded_stayed_float(target, excluded)
    info = QuantizationInfo(
        fp32_path=str(source),
        int8_path=str(target),
        preset=chosen.name,
        per_channel=per_channel,
        reduce_range=chosen.reduce_range,
        weight_type="QInt8",
        op_types=list(chosen.op_types),
        excluded_nodes=excluded,
        fp32_bytes=source.stat().st_size,
        int8_bytes=target.stat().st_size,
        onnxruntime_version=onnxruntime.__version__,
    )
    logger.info(
        "quantized %s -> %s (%s, per_channel=%s): %d -> %d bytes, kept fp32: %s",
        source,
        target,
        chosen.name,
        per_channel,
        info.fp32_bytes,
        info.int8_bytes,
        excluded or "nothing",
    )
    return info
