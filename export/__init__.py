"""Export: a trained student to fp32 ONNX (``logits`` + ``pooled``), int8 quantization, parity checks.

Needs the ``export`` extra (torch, transformers, optimum, onnx); the runtime never imports this
package. torch and onnx are imported inside the functions that use them, so importing it is cheap.
"""

from darl_lite.export.onnx_export import OnnxExportInfo, export_onnx
from darl_lite.export.parity import (
    ParityError,
    ParityReport,
    ParityThresholds,
    check_parity,
    parity_report,
    worst_pairs,
)
from darl_lite.export.quantize import (
    PRESETS,
    NodeSensitivity,
    QuantizationInfo,
    QuantPreset,
    head_nodes,
    quantizable_nodes,
    quantize_int8,
    sensitivity_sweep,
)

__all__ = [
    "PRESETS",
    "NodeSensitivity",
    "OnnxExportInfo",
    "ParityError",
    "ParityReport",
    "ParityThresholds",
    "QuantPreset",
    "QuantizationInfo",
    "check_parity",
    "export_onnx",
    "head_nodes",
    "parity_report",
    "quantizable_nodes",
    "quantize_int8",
    "sensitivity_sweep",
    "worst_pairs",
]
