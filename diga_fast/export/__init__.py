"""Deployment: ONNX (verified in ONNX Runtime), TorchScript (legacy) and torch.export ``.pt2`` files of a
segmentation model, and an ONNX Runtime wrapper for prediction, evaluation and the bench.

    from diga_fast.export import export_model, OnnxSegmenter
    export_model(model, label_space, {"onnx": "model.onnx", "pt2": "model.pt2"})
    segmenter = OnnxSegmenter("model.onnx")       # CUDA provider when present, CPU otherwise
    logits = segmenter(images)                    # [B, 3, H, W] RGB in [0, 1] -> [B, K, H, W]

Every exported graph is ``InferenceWrapper``: image -> logits at input resolution (or labels).
"""

from diga_fast.export.api import FORMATS, ExportResult, export_checkpoint, export_model
from diga_fast.export.onnx import OPSET, export_onnx
from diga_fast.export.pt2 import export_pt2, load_pt2
from diga_fast.export.runtime import OnnxSegmenter, physical_cores, read_onnx_metadata
from diga_fast.export.torchscript import export_torchscript, load_torchscript
from diga_fast.export.verify import (
    Parity,
    foreign_fx_targets,
    foreign_onnx_ops,
    foreign_torchscript_ops,
    measure_parity,
)
from diga_fast.export.wrapper import InferenceWrapper, label_space_from_metadata

__all__ = [
    "FORMATS", "OPSET", "ExportResult", "InferenceWrapper", "OnnxSegmenter", "Parity", "export_checkpoint", "export_model",
    "export_onnx", "export_pt2", "export_torchscript", "foreign_fx_targets", "foreign_onnx_ops",
    "foreign_torchscript_ops", "label_space_from_metadata", "load_pt2", "load_torchscript",
    "measure_parity", "physical_cores", "read_onnx_metadata",
]
