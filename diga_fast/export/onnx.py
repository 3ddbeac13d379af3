"""ONNX export: the ``torch.export``-based exporter (``dynamo=True``) by default, the TorchScript-based
legacy exporter as a fallback.

* Opset ``OPSET`` (18) unless asked otherwise: the oldest opset the dynamo exporter targets natively,
  read by every ONNX Runtime since 1.14, TensorRT 8.6+ and OpenVINO; nothing in these nets needs a
  newer one (GroupNorm becomes InstanceNormalization + Reshape, upsampling becomes Resize).
* Dynamic batch, height and width, named ``batch``, ``height``, ``width`` in the graph.
* Constant folding and the exporter's graph optimiser run (``optimize=True`` /
  ``do_constant_folding=True``); ONNX Runtime does the Conv+BN fusion when it loads the file.
* One self-contained file when the weights fit a protobuf (< ``EXTERNAL_DATA_BYTES``); above that the
  weights go to ``NAME.onnx.data`` beside it.
* ``metadata_props`` carry :func:`~diga_fast.export.wrapper.export_metadata` plus ``diga.exporter`` and
  ``diga.opset``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from diga_fast.errors import DigaError
from diga_fast.export.wrapper import (
    InferenceWrapper,
    weight_bytes,
)

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole file


@contextlib.contextmanager
def quiet_export():
    """The exporters talk a lot (progress lines, torchvision-op notes, FutureWarnings from pytree):
    keep stdout/stderr for diga's own report. Errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(wrapper: InferenceWrapper, path: str | Path, example: torch.Tensor, metadata: dict[str, str],
                legacy: bool = False, opset: int = OPSET) -> dict[str, str]:
    """Write ``wrapper`` to ``path`` as ONNX; returns the metadata it stored (exporter, opset, ...)."""
    import onnx

    path = Path(path)
    external = weight_bytes(wrapper) >= EXTERNAL_DATA_BYTES
    output = wrapper.output_name
    axes = {"image": {0: "batch", 2: "height", 3: "width"},
            output: {0: "batch", 1: "height", 2: "width"} if wrapper.argmax else {0: "batch", 2: "height", 3: "width"}}
    wrapper.eval()
    try:
        with quiet_export(), torch.no_grad():
            if legacy:
                torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=["image"],
                                  output_names=[output], dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True)
            else:
                program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["image"],
                                            output_names=[output], opset_version=opset, optimize=True,
                                            dynamic_shapes={"image": axes["image"]}, verbose=False)
                program.save(str(path), external_data=external)
    except Exception as err:  # noqa: BLE001 - exporter failures come in many types
        text = " ".join(str(err).split())[:400]
        hint = "" if legacy or isinstance(err, OSError) else " (try --legacy)"
        raise DigaError(f"ONNX export failed{hint}: {type(err).__name__}: {text}") from None
    stored = dict(metadata)
    stored["diga.exporter"] = "torch.onnx legacy (TorchScript-based)" if legacy else "torch.onnx dynamo (torch.export-based)"
    stored["diga.opset"] = str(opset)
    model = onnx.load(str(path), load_external_data=False)
    keep = [p for p in model.metadata_props if p.key not in stored]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in stored.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"diga-fast {metadata.get('diga.arch', '')} segmentation: {metadata.get('diga.input', '')}"
    onnx.save_model(model, str(path))  # external tensors keep pointing at their .data file
    return stored
