"""What every exported graph computes, and what it records about itself.

``InferenceWrapper`` turns a :class:`SegmentationModel` (RGB in [0, 1] -> logits at the output
stride, feature) into the deployable function

    image  float32 [B, 3, H, W], RGB in [0, 1]
      -> logits float32 [B, K, H, W]   (bilinear upsampling to the input size, align_corners=True,
                                        as in training and ``predict_logits``)
      or labels int64   [B, H, W]      (argmax over K, with ``argmax=True``)

Normalisation stays inside the model, so the graph takes plain RGB. With ``fp16=True`` the weights
and every activation are float16 while the boundaries stay float32: the graph casts ``image`` to
float16 on the way in and the logits back to float32 on the way out, so callers feed and read the
same tensors whatever the precision.

Batch, height and width are dynamic. The example input is batch 2 (``torch.export`` specialises a
dimension whose example size is 1) at 64 x 96, a size the verification never uses. Height and width
must be at least ``MIN_SIDE``: below that the stride-8 logits of the smallest models shrink to one
pixel, a case ``align_corners=True`` upsampling treats differently.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from diga_fast.models import SegmentationModel

EXAMPLE_SHAPE = (2, 3, 64, 96)
MIN_SIDE = 16
MAX_SIDE = 16384
MAX_BATCH = 1024
FORMAT = "diga-fast-export/1"


class InferenceWrapper(nn.Module):
    """``image`` -> ``logits`` at input resolution (or ``labels``); see the module docstring."""

    def __init__(self, model: SegmentationModel, argmax: bool = False, fp16: bool = False) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        self.model = model.half() if fp16 else model.float()
        self.argmax = argmax
        self.fp16 = fp16

    @property
    def output_name(self) -> str:
        return "labels" if self.argmax else "logits"

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.half() if self.fp16 else image
        logits = self.model(x)[0]
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True).float()
        return logits.argmax(1) if self.argmax else logits


def example_image(shape: tuple[int, int, int, int] = EXAMPLE_SHAPE) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def torch_dynamic_shapes() -> dict:
    """``dynamic_shapes`` for ``torch.export``: batch, height and width dynamic. ``Dim.DYNAMIC`` (not a
    named ``Dim``) because the export's shape solver cannot prove some always-true guards (e.g. the
    ceil-mode max-pool of DeepLabV2) and would otherwise ask for heights that are multiples of 4."""
    from torch.export import Dim

    side = Dim.DYNAMIC(min=MIN_SIDE, max=MAX_SIDE)
    return {"image": {0: Dim.DYNAMIC(min=1, max=MAX_BATCH), 2: side, 3: side}}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diga-fast")
    except PackageNotFoundError:
        return "unknown"


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_metadata(model: SegmentationModel, checkpoint_meta: dict[str, str], wrapper: InferenceWrapper,
                    label_space) -> dict[str, str]:
    """String key -> string value, stored as ONNX ``metadata_props`` (and as ``diga.json`` inside the
    TorchScript and .pt2 archives): enough to colour and name predictions without the checkpoint."""
    return {
        "diga.format": FORMAT,
        "diga.version": package_version(),
        "diga.arch": model.arch,
        "diga.num_classes": str(model.num_classes),
        "diga.label_space": label_space.name,
        "diga.classes": json.dumps(list(label_space.classes)),
        "diga.label_ids": json.dumps(list(label_space.label_ids)),
        "diga.palette": json.dumps(label_space.palette.tolist()),
        "diga.recipe": checkpoint_meta.get("recipe", ""),
        "diga.output": wrapper.output_name,
        "diga.precision": wrapper.precision,
        "diga.input": "image: float32 [B, 3, H, W] RGB in [0, 1] (normalised inside the graph)",
        "diga.min_side": str(MIN_SIDE),
        "diga.torch": torch.__version__,
    }


def label_space_from_metadata(metadata: dict[str, str]):
    """The :class:`LabelSpace` an export was made for: the named one when this version knows it and its
    classes match, else one rebuilt from the stored class names, label ids and palette."""
    import numpy as np

    from diga_fast.labels import LABEL_SPACES, LabelSpace
    from diga_fast.errors import DigaError

    try:
        classes = tuple(json.loads(metadata["diga.classes"]))
        label_ids = tuple(int(i) for i in json.loads(metadata["diga.label_ids"]))
        palette = np.array(json.loads(metadata["diga.palette"]), dtype=np.uint8).reshape(len(classes), 3)
        name = metadata["diga.label_space"]
    except (KeyError, ValueError, TypeError) as err:
        raise DigaError(f"the export's class table (diga.* metadata) is incomplete or unreadable: {err}") from None
    known = LABEL_SPACES.get(name)
    if known is not None and known.classes == classes and known.label_ids == label_ids:
        return known
    return LabelSpace(name=name, classes=classes, label_ids=label_ids, palette=palette)
