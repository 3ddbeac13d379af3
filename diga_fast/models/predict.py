"""A segmentation model's logits at the input's size, at one or several scales: what evaluation,
pseudo-labelling and prediction share."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from diga_fast.models.base import SegmentationModel, upsample_to

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def logits_fn(model: SegmentationModel | LogitsFn) -> LogitsFn:
    """A model's logits (its first output), or ``model`` itself when it already is a ``LogitsFn``."""
    if isinstance(model, torch.nn.Module):
        return lambda x: model(x)[0]
    return model


@torch.no_grad()
def predict_logits(model: SegmentationModel | LogitsFn, images: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Logits at full input size: for each scale, resize the image (bilinear), run the model,
    upsample the logits to full size; combine scales by element-wise max."""
    forward = logits_fn(model)
    size = tuple(images.shape[-2:])
    combined = None
    for scale in scales:
        x = images
        if scale != 1.0:
            scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            x = F.interpolate(images, size=scaled, mode="bilinear", align_corners=True)
        logits = upsample_to(forward(x).float(), size)
        combined = logits if combined is None else torch.maximum(combined, logits)
    return combined
