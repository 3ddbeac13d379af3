"""Loss terms. Each is the plain PyTorch form of a line in method.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diga_fast.data.labels import IGNORE_INDEX


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of logits to label size (align_corners=True, as the official code)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def segmentation_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, labels) with ignore index 255, averaged over valid pixels (method.md: diga-fast
    averages over valid pixels; the official code divides by all pixels). 0 when none is valid."""
    logits = upsample_to(logits, labels.shape[-2:]).float()
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
