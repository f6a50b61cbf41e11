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

Beyond the head, a few encoder matrix products carry most of the quantization error: on the
quickstart's MiniLM-L6 student, the feed-forward output projections of the first layers (whose
inputs have outlier channels that a per-tensor activation scale flattens). They are found by
measurement, not by name: :func:`sensitivity_sweep` quantizes one node at a time (everything else
fp32) and ranks nodes by the mean KL divergence of the grade distribution from fp32 on sample
pairs; the export then keeps the worst few in fp32 until the parity gate passes
(``darl_lite.export.build``). Each excluded node is recorded with its reason in
:attr:`QuantizationInfo.exclusion_reasons`.

``mode="static"`` keeps the dynamic graph's weights and kernels but fixes each activation's scale
once, from calibration batches (:func:`static_activation_scales`): every ``DynamicQuantizeLinear``
becomes a ``QuantizeLinear`` at the 0.01/99.99 percentiles of that activation over real tokens, and
each int8 product a ``MatMulIntegerToFloat`` (``QAttention`` reads the fixed scale as it read the
dynamic one). onnxruntime's own ``quantize_static`` was measured and not used: it has no static
``QAttention`` (so the fused graph loses its attention kernel), its QDQ graph also quantizes the
residual stream and the attention scores, and on the quickstart student it agreed with fp32 on
0.9585 of 2,000 dev pairs (dynamic: 0.984) at 0.76x the shipped graph's speed. Fixed scales
themselves ran at the dynamic graph's speed (1.00-1.03x, the per-batch min/max is cheap); what they
buy is quality and determinism: 0.9935 dev agreement with the same exclusions, a pair's score no
longer depends on the other pairs of its batch, and the gate passes with only the head fp32, whose
fewer fp32 products are what makes the static graph faster (``python -m bench.graph_levers --static``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from darl_lite.calibration import softmax
from darl_lite.errors import InputError, MissingExtraError

logger = logging.getLogger(__name__)

Preset = Literal["avx2", "avx512_vnni", "arm64"]
Mode = Literal["dynamic", "static"]
#: Calibration feeds: the runtime's batches (``RelevanceModel.plan(...).batches`` feeds), right-padded.
Feeds = Sequence[Mapping[str, NDArray[np.int64]]]

#: Percentile (and its mirror, 100 - it) of each activation that static scales cover. On the
#: quickstart student's dev pairs 99.99 agreed with fp32 more than min/max (100) or 99.999, and
#: 99.9 clipped too much (0.9935 against 0.990, 0.9845 and 0.965, every encoder node int8).
STATIC_PERCENTILE = 99.99

#: Node types that hold a weight matrix the head multiplies by.
HEAD_OP_TYPES = frozenset({"MatMul", "Gemm"})
#: Node types onnxruntime writes for a quantized matrix product.
_QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QAttention"}
)
#: Quantizable node types that hold a weight: matrix products, embedding tables, and the fused
#: ``Attention`` of a graph fused by :mod:`darl_lite.export.fuse` (its Q/K/V weight), which
#: onnxruntime quantizes into ``QAttention``. A type absent from a graph is simply not touched.
_OP_TYPES = ("MatMul", "Gather", "Attention")
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
_HEAD_REASON = "classifier head: tiny, so quantizing it saves nothing measurable but moves logits"
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
        "avx2", True, _OP_TYPES, "7-bit weights: vpmaddubsw's int16 pair sums cannot saturate"
    ),
    "avx512_vnni": QuantPreset(
        "avx512_vnni", False, _OP_TYPES, "vpdpbusd accumulates in int32: full 8-bit weights"
    ),
    "arm64": QuantPreset("arm64", False, _OP_TYPES, "sdot accumulates in int32: full 8-bit weights"),
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
    #: why each excluded node stayed fp32 (node name -> reason)
    exclusion_reasons: dict[str, str] = field(default_factory=dict)
    #: the sensitivity sweep behind data-driven exclusions, worst first (empty when none ran)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    #: "dynamic" (activation scales per batch at run time) or "static" (fixed, calibrated once)
    mode: str = "dynamic"
    #: static mode: calibration pairs (rows of the calibration batches) and the percentile covered
    calibration_pairs: int = 0
    activation_percentile: float | None = None

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


def _weight_input(node: Any) -> str:
    """The input holding a node's weight: a Gather's table, a MatMul/Gemm's B."""
    if node.op_type == "Gather":
        return str(node.input[0])
    return str(node.input[1]) if len(node.input) > 1 else ""


def _check_excluded_stayed_float(int8_path: Path, excluded: Sequence[str]) -> None:
    """Each excluded node must still be a float Gemm/MatMul/Gather in the int8 graph (a Gemm maybe
    renamed ``<name>_MatMul`` by ORT), reading a float weight."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    nodes = {node.name: node for node in graph.node}
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for name in excluded:
        quantized = [n for n, node in nodes.items() if node.op_type in _QUANTIZED_OPS and n.startswith(name)]
        kept = nodes.get(name) if name in nodes else nodes.get(name + _GEMM_AS_MATMUL)
        floating = (
            kept is not None
            and kept.op_type in HEAD_OP_TYPES | {"Gather", "Attention"}
            and _weight_input(kept) in float_weights
        )
        if quantized or not floating:
            raise RuntimeError(
                f"node {name!r} was to stay fp32, but the int8 graph {int8_path} has "
                f"{quantized or 'no float MatMul/Gemm/Gather/Attention of that name'}: this onnxruntime "
                "renames nodes in a way darl_lite.export does not know; quantize with "
                "exclude_nodes=None or pin onnxruntime, and report it"
            )


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    *,
    preset: Preset = "avx2",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] | Literal["auto"] | None = None,
    reasons: Mapping[str, str] | None = None,
    mode: Mode = "dynamic",
    calibration: Feeds | None = None,
    percentile: float = STATIC_PERCENTILE,
) -> QuantizationInfo:
    """Write an int8 copy of ``fp32_path`` to ``int8_path``.

    ``exclude_nodes`` is ``None`` (quantize every supported node), ``"auto"`` (keep the classifier
    head in fp32, found by :func:`head_nodes`), or explicit node names, each of which must exist.
    ``reasons`` maps excluded node names to why they stay fp32 (recorded in the result; head nodes
    get a default reason, other explicit names "requested by the caller").
    ``mode="static"`` then fixes the activation scales from ``calibration`` (required there: the
    runtime's batches of in-distribution training pairs) at ``percentile``; see
    :func:`static_activation_scales`.
    Check the result with :func:`darl_lite.export.parity.parity_report` before shipping it.
    """
    if mode not in ("dynamic", "static"):
        raise InputError(f"mode must be 'dynamic' or 'static', not {mode!r}")
    if mode == "static" and not calibration:
        raise InputError("mode='static' needs calibration batches (the runtime's feeds of training pairs)")
    info = _quantize(
        fp32_path,
        int8_path,
        preset=preset,
        per_channel=per_channel,
        exclude_nodes=exclude_nodes,
        reasons=reasons,
    )
    if mode == "static" and calibration:
        rows = static_activation_scales(int8_path, calibration, percentile=percentile)
        info = replace(
            info,
            mode="static",
            calibration_pairs=rows,
            activation_percentile=percentile,
            int8_bytes=Path(int8_path).stat().st_size,
        )
    logger.info(
        "quantized %s -> %s (%s, %s, per_channel=%s): %d -> %d bytes, kept fp32: %s",
        info.fp32_path,
        info.int8_path,
        info.preset,
        info.mode,
        per_channel,
        info.fp32_bytes,
        info.int8_bytes,
        info.excluded_nodes or "nothing",
    )
    return info


def _quantize(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    *,
    preset: Preset = "avx2",
    per_channel: bool = True,
    exclude_nodes: Sequence[str] | Literal["auto"] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> QuantizationInfo:
    """:func:`quantize_int8` without the log line (the sensitivity sweep calls it ~40 times)."""
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

    heads = set(head_nodes(model)) if exclude_nodes == "auto" else set()
    given = dict(reasons or {})
    why = {
        name: given.get(name) or (_HEAD_REASON if name in heads else "requested by the caller")
        for name in excluded
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        model,
        target,
        op_types_to_quantize=list(chosen.op_types),
        per_channel=per_channel,
        reduce_range=chosen.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[*excluded, *(n + _GEMM_AS_MATMUL for n in excluded)],
        # DefaultTensorType: onnx shape inference cannot type the outputs of fused contrib ops
        # (Attention); they are float32.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    _check_excluded_stayed_float(target, excluded)
    return QuantizationInfo(
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
        exclusion_reasons=why,
    )


def quantizable_nodes(model: Any, preset: Preset = "avx2") -> list[str]:
    """Nodes of ``model`` (an ``onnx.ModelProto``) the preset would quantize: its op types with an
    initializer weight (a MatMul's B, a Gather's table), in graph order. Candidates for exclusion."""
    op_types = set(PRESETS[preset].op_types) | {"Gemm"}
    initializers = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and _weight_input(n) in initializers]


@dataclass(frozen=True)
class NodeSensitivity:
    """What quantizing one node alone (everything else fp32) does to the grade distribution."""

    node: str
    mean_kl: float  # mean KL(fp32 || int8) of the softmaxed logits over the sample pairs
    argmax_agreement: float  # share of sample pairs whose argmax grade is unchanged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sensitivity_sweep(
    fp32_path: str | os.PathLike[str],
    logits_of: Callable[[Path], NDArray[np.floating]],
    *,
    preset: Preset = "avx2",
    per_channel: bool = True,
    always_excluded: Sequence[str] = (),
    candidates: Sequence[str] | None = None,
) -> list[NodeSensitivity]:
    """Rank ``candidates`` (default: every quantizable node not in ``always_excluded``) by how much
    quantizing each one alone moves the model's grade distribution, worst first.

    ``logits_of(model_path)`` runs a graph on fixed sample pairs and returns their logits; it is
    called once on the fp32 graph (the reference) and once per candidate, on a graph where only
    that node is quantized. The cost is one quantization and one pass over the sample per node
    (about 40 nodes and 3-4 s each for MiniLM-L6 on 2 cores, 256 pairs). Ties keep graph order.
    """
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError.for_module(exc.name or "onnx", "export") from exc

    source = Path(fp32_path)
    model = onnx.load(str(source))
    every = quantizable_nodes(model, preset)
    fixed = list(always_excluded)
    names = [n for n in (every if candidates is None else candidates) if n not in fixed]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise InputError(f"candidates {unknown} are not quantizable nodes of {source}")
    if not names:
        return []
    reference = np.asarray(logits_of(source), np.float64)
    p_ref = softmax(reference)
    results = []
    with tempfile.TemporaryDirectory(prefix="darl-sweep-") as tmp:
        single = Path(tmp) / "single.onnx"
        for name in names:
            others = [n for n in every if n != name]
            _quantize(source, single, preset=preset, per_channel=per_channel, exclude_nodes=others)
            logits = np.asarray(logits_of(single), np.float64)
            if logits.shape != reference.shape:
                raise InputError(
                    f"logits_of returned shape {logits.shape} for {name!r} but {reference.shape} for fp32; "
                    "it must score the same pairs every call"
                )
            p = softmax(logits)
            kl = float(np.mean(np.sum(p_ref * (np.log(p_ref + 1e-12) - np.log(p + 1e-12)), axis=1)))
            agree = float(np.mean(np.argmax(logits, axis=1) == np.argmax(reference, axis=1)))
            results.append(NodeSensitivity(name, kl, agree))
            logger.debug("sensitivity of %s: KL %.3g, agreement %.4f", name, kl, agree)
    order = sorted(range(len(results)), key=lambda i: (-results[i].mean_kl, i))
    return [results[i] for i in order]


def static_activation_scales(
    int8_path: str | os.PathLike[str], calibration: Feeds, *, percentile: float = STATIC_PERCENTILE
) -> int:
    """Fix the activation scales of a dynamic int8 graph written by :func:`quantize_int8`, in place.

    Each ``DynamicQuantizeLinear`` input is measured through this very graph on ``calibration`` (the
    runtime's right-padded batches; so later layers' scales see earlier layers' int8 error), over
    real tokens only (``attention_mask``), and its per-batch uint8 scale and zero point become
    constants covering ``[P(100 - percentile), P(percentile)]`` (widened to include 0, as
    onnxruntime's dynamic quantizer does). The ``MatMulInteger`` chains then become
    ``MatMulIntegerToFloat`` with the bias folded in: onnxruntime fuses them into
    ``DynamicQuantizeMatMul`` only behind a dynamic quantizer. Returns the calibration rows used.

    A pair's score then no longer depends on the other pairs of its batch.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise MissingExtraError.for_module(exc.name or "onnx", "export") from exc

    if not 50.0 < percentile <= 100.0:
        raise InputError(f"percentile must be in (50, 100], not {percentile!r}")
    feeds = list(calibration)
    if not feeds or any("attention_mask" not in f for f in feeds):
        raise InputError("calibration must be non-empty batches of feeds with an attention_mask")
    path = Path(int8_path)
    model = onnx.load(str(path))
    graph = model.graph
    dynamic = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    if not dynamic:
        raise InputError(f"{path} has no DynamicQuantizeLinear: not a dynamic int8 graph of quantize_int8")
    ranges = _activation_ranges(model, [n.input[0] for n in dynamic], feeds, percentile)
    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        low, high = ranges[node.input[0]]
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero_point = int(np.clip(round(-low / scale), 0, 255))
        quantized, scale_name, zero_name = node.output
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zero_point, np.uint8), zero_name))
        nodes.append(
            helper.make_node(
                "QuantizeLinear", [node.input[0], scale_name, zero_name], [quantized], name=node.name
            )
        )
    rewritten = _integer_to_float(nodes, {i.name for i in graph.initializer})
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del graph.node[:]
    graph.node.extend(rewritten)
    onnx.save(model, str(path))
    return int(sum(f["attention_mask"].shape[0] for f in feeds))


def _activation_ranges(
    model: Any, names: Sequence[str], feeds: Sequence[Mapping[str, NDArray[np.int64]]], percentile: float
) -> dict[str, tuple[float, float]]:
    """``(P(100 - percentile), P(percentile))`` of each tensor in ``names`` over the real tokens of
    ``feeds``, exactly as ``np.percentile`` would give on all values, keeping only the two tails."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    tokens = sum(int(f["attention_mask"].sum()) for f in feeds)
    rows = sum(int(f["attention_mask"].shape[0]) for f in feeds)
    tails: dict[str, _Tails] = {}
    for feed in feeds:
        mask = np.asarray(feed["attention_mask"]).astype(bool)
        outputs = session.run(list(names), {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(names, outputs, strict=True):
            if value.ndim >= 2 and value.shape[:2] == mask.shape:
                real, total = value[mask], tokens * int(np.prod(value.shape[2:]))
            elif value.ndim >= 1 and value.shape[0] == mask.shape[0]:
                real, total = value, rows * int(np.prod(value.shape[1:]))
            else:
                raise InputError(f"activation {name!r} of shape {value.shape} has no batch axis to calibrate")
            if name not in tails:
                tails[name] = _Tails(total, percentile)
            tails[name].add(np.asarray(real, np.float64).ravel())
    return {name: tails[name].result() for name in names}


class _Tails:
    """The low and high ``percentile`` of ``total`` values seen batch by batch, keeping only the
    values that ``np.percentile``'s linear interpolation can touch (a few per 10,000)."""

    def __init__(self, total: int, percentile: float) -> None:
        self.total = total
        self.high_pos = (total - 1) * percentile / 100.0
        self.low_pos = (total - 1) * (100.0 - percentile) / 100.0
        self.k_high = min(total, total - int(np.floor(self.high_pos)))
        self.k_low = min(total, int(np.floor(self.low_pos)) + 2)
        self.high = np.empty(0)
        self.low = np.empty(0)

    def add(self, values: NDArray[np.float64]) -> None:
        high = np.concatenate([self.high, values])
        self.high = high if len(high) <= self.k_high else np.partition(high, -self.k_high)[-self.k_high :]
        low = np.concatenate([self.low, values])
        self.low = low if len(low) <= self.k_low else np.partition(low, self.k_low - 1)[: self.k_low]

    def result(self) -> tuple[float, float]:
        low = np.sort(self.low)
        f = int(np.floor(self.low_pos))
        lo = low[f] + (self.low_pos - f) * (low[min(f + 1, len(low) - 1)] - low[f])
        desc = np.sort(self.high)[::-1]  # desc[j] is the value at ascending index total - 1 - j
        f = int(np.floor(self.high_pos))
        a, b = desc[self.total - 1 - f], desc[max(self.total - 2 - f, 0)]
        hi = a + (self.high_pos - f) * (b - a)
        return float(lo), float(hi)


def _integer_to_float(nodes: list[Any], initializers: set[str]) -> list[Any]:
    """Each ``QuantizeLinear -> MatMulInteger -> Cast -> Mul(a_scale * b_scale) [-> Add(bias)]`` as
    one ``MatMulIntegerToFloat``; a chain of another shape is left as it is (correct, unfused)."""
    from onnx import helper

    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    dropped: set[int] = set()
    replaced: dict[int, Any] = {}
    for matmul in (n for n in nodes if n.op_type == "MatMulInteger" and len(n.input) == 4):
        quantize = producer.get(matmul.input[0])
        casts = consumers.get(matmul.output[0], [])
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(casts) != 1:
            continue
        muls = consumers.get(casts[0].output[0], [])
        if casts[0].op_type != "Cast" or len(muls) != 1 or muls[0].op_type != "Mul":
            continue
        rescale = muls[0]
        scales = producer.get(next(i for i in rescale.input if i != casts[0].output[0]))
        a_scale = quantize.input[1]
        if scales is None or scales.op_type != "Mul" or a_scale not in scales.input:
            continue
        b_scale = next(i for i in scales.input if i != a_scale)
        inputs = [matmul.input[0], matmul.input[1], a_scale, b_scale, matmul.input[2], matmul.input[3]]
        output, gone = rescale.output[0], [casts[0], rescale]
        if len(consumers.get(scales.output[0], [])) == 1:
            gone.append(scales)
        after = consumers.get(output, [])
        if len(after) == 1 and after[0].op_type == "Add":
            bias = [name for name in after[0].input if name != output]
            if len(bias) == 1 and bias[0] in initializers:
                inputs.append(bias[0])
                output = after[0].output[0]
                gone.append(after[0])
        dropped.update(id(n) for n in gone)
        replaced[id(matmul)] = helper.make_node(
            "MatMulIntegerToFloat", inputs, [output], name=matmul.name, domain="com.microsoft"
        )
    return [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]
