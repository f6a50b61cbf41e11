"""Put the OOD score into the ONNX graph, so the runtime gets it from the same onnxruntime pass.

Why: in numpy the whitening product ``(N, D) x (D, D)`` either runs on numpy's BLAS pool, which
busy-waits beside onnxruntime's threads on the same cores, or without BLAS at a fraction of its
speed; it cost 1.5 ms of a 100-item request (a quarter of the runtime's overhead). As graph nodes
it is one more small fp32 MatMul on onnxruntime's own thread pool.

The nodes compute exactly :meth:`darl_lite.ood.MahalanobisDetector.score` in float32:
``min_c |(x - c) L - (m_c - c) L|^2`` with ``P = L L^T`` and ``c`` the mean of the class means,
into one more output, :data:`darl_lite.inference.OOD_OUTPUT` ``(N,)``. The ``.npz`` statistics stay
in the bundle: they are the detector, and the runtime falls back to them for graphs without the output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from darl_lite.atomic import atomic_path
from darl_lite.errors import InputError, MissingExtraError
from darl_lite.inference import OOD_OUTPUT
from darl_lite.ood import MahalanobisDetector


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def append_ood_distance(
    model_path: str | os.PathLike[str],
    detector: MahalanobisDetector,
    *,
    pooled_name: str = "pooled",
    output_name: str = OOD_OUTPUT,
) -> None:
    """Add the detector's score of ``pooled_name`` as graph output ``output_name``, in place."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise MissingExtraError.for_module(exc.name or "onnx", "export") from exc

    path = Path(model_path)
    model = onnx.load(str(path))
    graph = model.graph
    pooled_shape = _check_graph(path, model, detector, pooled_name, output_name)
    center, whiten, means_z = detector.float32_whitening()
    constants: dict[str, np.ndarray] = {
        "center": center,
        "whiten": whiten,
        "means_z": means_z[None, :, :],  # (1, C, D): broadcasts against z (N, 1, D)
        "axis_last": np.asarray([-1], np.int64),
        "axis_one": np.asarray([1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, _PREFIX + k) for k, v in constants.items())
    graph.node.extend(_distance_nodes(helper, pooled_name, output_name, _opset(model)))
    batch = pooled_shape[0] if pooled_shape else None
    out = helper.make_tensor_value_info(
        output_name, TensorProto.FLOAT, [batch.dim_param or None] if batch else [None]
    )
    graph.output.append(out)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:  # a crash mid-save leaves the graph as it was
        onnx.save(model, str(tmp))


#: Name prefix of every node and initializer this module adds.
_PREFIX = "darl_ood/"


def _check_graph(
    path: Path, model: Any, detector: MahalanobisDetector, pooled_name: str, output_name: str
) -> Any:
    """The shape dims of output ``pooled_name``; :class:`InputError` if the graph cannot take the nodes."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    if pooled_name not in outputs:
        raise InputError(
            f"{path} has no output {pooled_name!r} to score; it has {sorted(outputs)}. Pass the graph "
            "written by darl_lite.export.export_onnx, or name its representation with pooled_name"
        )
    if output_name in outputs:
        raise InputError(
            f"{path} already has an output {output_name!r}: its OOD nodes were written before. "
            "Append to the graph as exported (before this step), or pass another output_name"
        )
    dim = detector.means.shape[1]
    pooled_shape = next(o for o in graph.output if o.name == pooled_name).type.tensor_type.shape.dim
    width = pooled_shape[-1].dim_value if pooled_shape else 0
    if width and width != dim:
        raise InputError(
            f"{path}: {pooled_name!r} has {width} features, the detector {dim}; fit the detector on "
            "this graph's own representations"
        )
    opset = _opset(model)
    if opset < 13:
        raise InputError(
            f"{path} uses opset {opset}; the OOD nodes need opset >= 13. Re-export the student with "
            "darl_lite.export.export_onnx (opset 17)"
        )
    return pooled_shape


def _distance_nodes(helper: Any, pooled_name: str, output_name: str, opset: int) -> list[Any]:
    """``min_c |(x - c) L - (m_c - c) L|^2`` as nodes over the ``_PREFIX`` initializers."""

    def name(k: str) -> str:
        return _PREFIX + k

    nodes = [
        helper.make_node("Sub", [pooled_name, name("center")], [name("x")], name=name("center_sub")),
        helper.make_node("MatMul", [name("x"), name("whiten")], [name("z")], name=name("whiten_matmul")),
        helper.make_node("Unsqueeze", [name("z"), name("axis_one")], [name("z3")], name=name("unsqueeze")),
        helper.make_node("Sub", [name("z3"), name("means_z")], [name("diff")], name=name("diff_sub")),
        helper.make_node("Mul", [name("diff"), name("diff")], [name("sq")], name=name("square")),
        helper.make_node(
            "ReduceSum", [name("sq"), name("axis_last")], [name("dist")], keepdims=0, name=name("sum")
        ),
    ]
    if opset >= 18:  # ReduceMin takes its axes as an input from opset 18
        nodes.append(
            helper.make_node(
                "ReduceMin", [name("dist"), name("axis_one")], [output_name], keepdims=0, name=name("min")
            )
        )
    else:
        nodes.append(
            helper.make_node(
                "ReduceMin", [name("dist")], [output_name], axes=[1], keepdims=0, name=name("min")
            )
        )
    return nodes
