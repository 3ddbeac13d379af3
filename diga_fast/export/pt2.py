"""``torch.export`` program (``.pt2``): the format PyTorch recommends for deployment from Python and
AOTInductor.

Batch, height and width are ``Dim.DYNAMIC`` (see :func:`~diga_fast.export.wrapper.torch_dynamic_shapes`),
traced from a batch-2 example (a size-1 example dimension would be specialised). Height and width
must be at least ``MIN_SIDE``; the loaded module checks that at run time. Metadata goes into the
archive as the extra file ``diga.json``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from diga_fast.errors import DigaError
from diga_fast.export.onnx import quiet_export
from diga_fast.export.wrapper import InferenceWrapper, torch_dynamic_shapes


def size_oblivious():
    """Trace with sizes treated as "not 0 or 1" without guarding on it. Without this, a map that is
    more than one pixel wide in the example but one pixel wide at run time fails a guard: MiT's
    key/value reduction of a 45-row input is such a map (ceil(45 / 4) // 8 = 1), though nothing in the
    computation depends on it. A no-op on a PyTorch without the switch."""
    config = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    if config is None or not hasattr(config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


def export_program(wrapper: InferenceWrapper, example: torch.Tensor) -> torch.export.ExportedProgram:
    wrapper.eval()
    try:
        with quiet_export(), torch.no_grad(), size_oblivious():
            return torch.export.export(wrapper, (example,), dynamic_shapes=torch_dynamic_shapes())
    except Exception as err:  # noqa: BLE001
        raise DigaError(f"torch.export failed: {type(err).__name__}: {' '.join(str(err).split())[:400]}") from None


def export_pt2(wrapper: InferenceWrapper, path: str | Path, example: torch.Tensor,
               metadata: dict[str, str]) -> dict[str, str]:
    stored = {**metadata, "diga.exporter": "torch.export"}
    program = export_program(wrapper, example)
    torch.export.save(program, str(path), extra_files={"diga.json": json.dumps(stored)})
    return stored


def load_pt2(path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """(program, metadata) of a .pt2 export; ``program.module()`` is the callable."""
    extra = {"diga.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:  # noqa: BLE001
        raise DigaError(f"cannot load {path} as a torch.export program: {' '.join(str(err).split())[:300]}") from None
    return program, json.loads(extra["diga.json"] or "{}")
