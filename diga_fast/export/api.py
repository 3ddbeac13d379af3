"""``export_model``: write a model as ONNX / TorchScript / .pt2, load each file back, check it.

Every file is written under a temporary name beside its destination, loaded back (ONNX Runtime on the
CPU for ONNX, ``torch.jit.load`` / ``torch.export.load`` for the others), checked for non-standard ops
and for parity with the fp32 PyTorch model (:mod:`diga_fast.export.verify`), and only then renamed to
its destination. A file that fails is deleted and the export raises :class:`DigaError`, so a bad file
never sits where a good one is expected. (ONNX files too large for one protobuf are the exception:
their weights' side file is named after the destination, so they are written in place and deleted on
failure.)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diga_fast.errors import DigaError
from diga_fast.export.onnx import EXTERNAL_DATA_BYTES, OPSET, export_onnx
from diga_fast.export.pt2 import export_pt2, load_pt2
from diga_fast.export.torchscript import export_torchscript, load_torchscript
from diga_fast.export.verify import (
    Parity,
    foreign_fx_targets,
    foreign_onnx_ops,
    foreign_torchscript_ops,
    measure_parity,
)
from diga_fast.export.wrapper import (
    InferenceWrapper,
    example_image,
    export_metadata,
    weight_bytes,
)
from diga_fast.labels import get_label_space
from diga_fast.models import SegmentationModel
from diga_fast.models.io import load_model
from diga_fast.utils.io import check_output_file, make_parent

FORMATS = ("onnx", "torchscript", "pt2")


@dataclass
class ExportResult:
    format: str
    path: Path
    exporter: str
    parity: Parity
    size_bytes: int
    metadata: dict[str, str]

    def summary(self) -> str:
        return (f"{self.format:<11} {self.path}  [{self.exporter}, {self.metadata.get('diga.precision')}, "
                f"{self.size_bytes / 2**20:.1f} MiB]  {self.parity.summary()}")


def export_model(
    model: SegmentationModel,
    label_space,
    targets: dict[str, str | Path],
    *,
    checkpoint_meta: dict[str, str] | None = None,
    argmax: bool = False,
    fp16: bool = False,
    legacy: bool = False,
    opset: int = OPSET,
    log: Callable[[str], None] | None = None,
) -> list[ExportResult]:
    """Export ``model`` to each ``{format: path}`` of ``targets`` (formats: ``FORMATS``) and verify it.
    Returns one :class:`ExportResult` per file; raises DigaError at the first file that fails."""
    unknown = set(targets) - set(FORMATS)
    if unknown:
        raise DigaError(f"unknown export format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if not targets:
        raise DigaError("nothing to export: give --onnx, --torchscript and/or --pt2")
    paths = {fmt: check_output_file(path, f"--{fmt}") for fmt, path in targets.items()}
    resolved = [p.resolve() for p in paths.values()]
    if len(set(resolved)) != len(resolved):
        raise DigaError("give each export format its own output file")
    if not legacy and opset < 18:
        raise DigaError(f"--opset {opset}: the torch.export-based exporter writes opset 18 or newer (or use --legacy)")
    if legacy and opset > 20:
        raise DigaError(f"--opset {opset}: the legacy exporter writes opset 20 at most")

    for path in paths.values():
        try:
            make_parent(path)
        except OSError as err:
            raise DigaError(f"cannot create folder {path.parent}: {err.strerror or err}") from None
    model = model.cpu().eval()
    reference = InferenceWrapper(model)  # fp32 logits: what every export is compared with
    wrapper = InferenceWrapper(model, argmax=argmax, fp16=fp16)
    metadata = export_metadata(model, checkpoint_meta or {}, wrapper, label_space)
    example = example_image()
    results = []
    for fmt, path in paths.items():
        if log:
            log(f"exporting {fmt} to {path} ...")
        results.append(_export_one(fmt, path, wrapper, reference, example, metadata, legacy, opset))
        if log:
            log(results[-1].summary())
    return results


def export_checkpoint(checkpoint: str | Path, targets: dict[str, str | Path], *, argmax: bool = False,
                      fp16: bool = False, log: Callable[[str], None] | None = None, **options) -> list[ExportResult]:
    """``diga export``: :func:`export_model` of the model a run folder or weights file holds, in its label
    space, with the checkpoint's metadata; ``log`` first gets a line on what goes in and out."""
    model, meta = load_model(checkpoint)
    space = get_label_space(meta["label_space"])
    if log:
        output = "labels int64 [B, H, W]" if argmax else f"logits float32 [B, {model.num_classes}, H, W]"
        log(f"{model.arch} ({model.num_classes} classes, {space.name}) from {checkpoint}: image float32 "
            f"[B, 3, H, W] -> {output}, {'fp16' if fp16 else 'fp32'} compute")
    return export_model(model, space, targets, checkpoint_meta=meta, argmax=argmax, fp16=fp16, log=log, **options)


def _export_one(fmt: str, path: Path, wrapper: InferenceWrapper, reference: InferenceWrapper,
                example: torch.Tensor, metadata: dict[str, str], legacy: bool, opset: int) -> ExportResult:
    in_place = fmt == "onnx" and weight_bytes(wrapper) >= EXTERNAL_DATA_BYTES
    tmp = path if in_place else path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    written = [tmp, tmp.with_name(tmp.name + ".data")]
    try:
        if fmt == "onnx":
            stored = export_onnx(wrapper, tmp, example, metadata, legacy=legacy, opset=opset)
            candidate, foreign = _load_onnx(tmp)
        elif fmt == "torchscript":
            stored = export_torchscript(wrapper, tmp, example, metadata)
            module, _ = load_torchscript(tmp)
            candidate, foreign = module, foreign_torchscript_ops(module)
        else:
            stored = export_pt2(wrapper, tmp, example, metadata)
            program, _ = load_pt2(tmp)
            candidate, foreign = program.module(), foreign_fx_targets(program)
        if foreign:
            raise DigaError(f"{fmt} export of {path.name} holds non-standard ops ({', '.join(foreign[:5])}); "
                            "training-time kernels must not reach an exported graph")
        try:
            parity = measure_parity(reference, candidate, wrapper.precision)
        except DigaError:
            raise
        except Exception as err:  # noqa: BLE001 - a graph that fails on another input size
            raise DigaError(f"{fmt} export of {path.name} fails on inputs other than the export example: "
                            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
        if not parity.ok:
            raise DigaError(f"{fmt} export of {path.name} does not match PyTorch ({parity.summary()}); "
                            "file removed")
        size = sum(p.stat().st_size for p in written if p.exists())
        if not in_place:
            os.replace(tmp, path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    exporter = stored["diga.exporter"] + (f", opset {stored['diga.opset']}" if "diga.opset" in stored else "")
    return ExportResult(fmt, path, exporter, parity, size, stored)


def _load_onnx(path: Path):
    import onnx

    from diga_fast.export.runtime import OnnxSegmenter

    segmenter = OnnxSegmenter(path, device="cpu")
    foreign = foreign_onnx_ops(onnx.load(str(path), load_external_data=False))
    return (lambda image: segmenter.run(image.numpy())), foreign
