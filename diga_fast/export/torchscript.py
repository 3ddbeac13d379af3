"""TorchScript export (``torch.jit.trace``): legacy.

PyTorch deprecates TorchScript (``torch.jit.trace``/``load`` warn with a DeprecationWarning and point to
``torch.export``); the format is kept for C++ deployments that still link libtorch's JIT. Those
warnings, and the tracer's note about a Python-boolean check that only matters in training (the
"more than one value per channel" test of the normalisation layers), are silenced here, and
``diga export`` says once that the format is legacy. Prefer ``--onnx`` or ``--pt2``.

Tracing records the shape arithmetic (``image.shape`` feeds the final upsampling and the pooling
branch), so batch, height and width stay dynamic; the parity check at two sizes other than the
example's proves it for every export. Metadata goes into the archive as ``extra/diga.json``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from diga_fast.errors import DigaError
from diga_fast.export.wrapper import InferenceWrapper

LEGACY_NOTE = "TorchScript is legacy (PyTorch deprecates torch.jit); its deprecation warnings are silenced — prefer --onnx or --pt2"


@contextlib.contextmanager
def _no_jit_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def export_torchscript(wrapper: InferenceWrapper, path: str | Path, example: torch.Tensor,
                       metadata: dict[str, str]) -> dict[str, str]:
    stored = {**metadata, "diga.exporter": "torch.jit.trace (legacy)"}
    wrapper.eval()
    try:
        with _no_jit_warnings(), torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"diga.json": json.dumps(stored)})
    except Exception as err:  # noqa: BLE001
        raise DigaError(f"TorchScript export failed: {type(err).__name__}: {' '.join(str(err).split())[:400]}") from None
    return stored


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """(module, metadata) of a TorchScript export."""
    extra = {"diga.json": ""}
    try:
        with _no_jit_warnings():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # noqa: BLE001
        raise DigaError(f"cannot load TorchScript file {path}: {' '.join(str(err).split())[:300]}") from None
    return module.eval(), json.loads(extra["diga.json"] or "{}")
