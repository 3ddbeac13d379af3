"""Does an exported file compute what the PyTorch model computes? And does it hold only standard ops?

Parity is measured against the fp32 PyTorch model (``InferenceWrapper(model)``), whatever the export's
precision, on ``VERIFY_SHAPES``: two input sizes that differ from the export example (so a graph that
silently specialised to the example shape fails), odd sizes and batch 1 and 3 included. Two numbers:

* ``max_abs_error``: max |logit_export - logit_torch| over every element (logits exports only);
* ``agreement``: the share of pixels whose exported class is the PyTorch argmax. A pixel where the
  two top PyTorch logits lie within the tolerance of each other (a near-tie, e.g. in an untrained
  net) counts as agreeing when the export picks either of them: there the argmax is decided by
  rounding, not by the model. ``strict_agreement`` is the plain share, printed beside it.

The tolerance is ``TOLERANCE[precision] * max(1, max |logit_torch|)``: 1e-4 (fp32) and 1e-2 (fp16)
for logits up to 1 in magnitude, relative to the logit scale above that (fp16 has 11 significant
bits, so a logit of 20 cannot be stored closer than 0.008). An export passes when the error is within
the tolerance and ``agreement >= MIN_AGREEMENT`` (99.9 %).

Standard ops only: the fused Triton kernels are training-time code; an exported graph must hold
nothing but ONNX-domain ops / ``aten`` ops, so it runs wherever ONNX Runtime or PyTorch does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

VERIFY_SHAPES = ((1, 3, 67, 101), (3, 3, 45, 83))
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
MIN_AGREEMENT = 0.999


@dataclass
class Parity:
    precision: str
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    max_abs_error: float | None = None  # None for label exports
    tolerance: float = 0.0
    agreement: float = 1.0
    strict_agreement: float = 1.0

    @property
    def ok(self) -> bool:
        error_ok = self.max_abs_error is None or self.max_abs_error <= self.tolerance
        return error_ok and self.agreement >= MIN_AGREEMENT

    def summary(self) -> str:
        sizes = ", ".join("x".join(map(str, s)) for s in self.shapes)
        error = "labels output" if self.max_abs_error is None else (
            f"max |Δlogit| {self.max_abs_error:.2e} (tolerance {self.tolerance:.1e})")
        return (f"{error}, argmax agreement {100 * self.agreement:.3f} % "
                f"(strict {100 * self.strict_agreement:.3f} %) on {sizes}")


def verification_images(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Smooth random images (blobs plus a little noise) in [0, 1]: closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    low = torch.rand(b, c, max(2, h // 8), max(2, w // 8), generator=g)
    smooth = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (smooth + 0.1 * torch.randn(b, c, h, w, generator=g)).clamp_(0, 1)


def measure_parity(reference: Callable[[torch.Tensor], torch.Tensor],
                   candidate: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
                   precision: str = "fp32", shapes: Sequence[Sequence[int]] = VERIFY_SHAPES) -> Parity:
    """``reference``: image -> fp32 logits [B, K, H, W] (PyTorch). ``candidate``: image -> logits or
    int labels [B, H, W] (the exported file, loaded back)."""
    parity = Parity(precision=precision)
    errors, agree, strict, pixels, tolerance = [], 0, 0, 0, 0.0
    for index, shape in enumerate(shapes):
        image = verification_images(shape, seed=index)
        with torch.no_grad():
            ref = reference(image).float()
            got = candidate(image)
        out = (got if isinstance(got, torch.Tensor) else torch.from_numpy(np.asarray(got))).detach().cpu()
        scale = max(1.0, float(ref.abs().max()))
        tolerance = max(tolerance, TOLERANCE[precision] * scale)
        if out.dim() == 4:
            if out.shape != ref.shape:
                raise ValueError(f"output shape {tuple(out.shape)} != PyTorch's {tuple(ref.shape)}")
            errors.append(float((out.float() - ref).abs().max()))
            labels = out.float().argmax(1)
        else:
            if out.shape != ref.shape[:1] + ref.shape[2:]:
                raise ValueError(f"labels shape {tuple(out.shape)} != {tuple(ref.shape[:1] + ref.shape[2:])}")
            labels = out.long()
        top = ref.max(1).values
        chosen = ref.gather(1, labels.unsqueeze(1)).squeeze(1)
        agree += int((chosen >= top - TOLERANCE[precision] * scale).sum())
        strict += int((labels == ref.argmax(1)).sum())
        pixels += labels.numel()
        parity.shapes.append(tuple(shape))
    parity.max_abs_error = max(errors) if errors else None
    parity.tolerance = tolerance
    parity.agreement = agree / pixels
    parity.strict_agreement = strict / pixels
    return parity


# ------------------------------------------------------------------ standard ops only
_ONNX_DOMAINS = ("", "ai.onnx")


def foreign_onnx_ops(model) -> list[str]:
    """Ops of an ``onnx.ModelProto`` outside the standard ONNX domain (custom ops, Triton, ...),
    subgraphs and local functions included, as ``domain::op_type``."""
    found: list[str] = []

    def visit(nodes) -> None:
        for node in nodes:
            if node.domain not in _ONNX_DOMAINS or "triton" in node.op_type.lower():
                found.append(f"{node.domain}::{node.op_type}")
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    visit(attribute.g.node)
                for graph in attribute.graphs:
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return sorted(set(found))


def foreign_fx_targets(graph_module_or_program) -> list[str]:
    """``call_function`` targets of a torch.export program (or fx graph) that are not ``aten``/``prims``
    ops or Python's own shape arithmetic: custom ops, Triton kernel wrappers, ..."""
    import operator

    graph = graph_module_or_program.graph
    allowed_modules = {operator.__name__, "builtins", "math", "_operator"}
    found = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            ok = target.namespace in ("aten", "prims")
        elif isinstance(target, torch._ops.HigherOrderOperator):
            ok = False
        else:
            ok = getattr(target, "__module__", None) in allowed_modules or target in (
                torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not)
        if not ok or "triton" in str(target).lower():
            found.append(str(target))
    return sorted(set(found))


def foreign_torchscript_ops(script_module) -> list[str]:
    """Node kinds of a TorchScript module's graph (inlined) outside ``aten::`` and ``prim::``."""
    graph = script_module.inlined_graph if hasattr(script_module, "inlined_graph") else script_module.graph
    found = []

    def visit(block) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind.split("::")[0] not in ("aten", "prim") or "triton" in kind.lower():
                found.append(kind)
            for sub in node.blocks():
                visit(sub)

    visit(graph)
    return sorted(set(found))
