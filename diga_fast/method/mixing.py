"""ClassMix-style masks and the two mixes of DiGA.

* CrDoMix (warm-up and self-training, method.md Stage 1 step 2): per source image, pick floor(n/2)
  of the n label values present (255 counts as a value), always add 255; keep the strongly
  augmented source where the label is picked, the translated source elsewhere. Labels unchanged.
* Cross-domain ClassMix (self-training step 3): the same choice on the source labels pastes the
  picked source classes onto the strongly augmented target; the label is y_s there, the target's
  pseudo-label elsewhere.

The choice is a [B, 256] boolean table (``selected[b, v]``: keep source where the label is v), built
without host synchronisation, and the blend is one fused pass (``crdomix_blend``).
"""

from __future__ import annotations

import torch

from diga_fast.labels import IGNORE_INDEX
from diga_fast.utils.dist import random_rows
from diga_fast.kernels import crdomix_blend

NUM_VALUES = 256


def classmix_selection(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, H, W] labels (0..255) -> selected [B, 256] bool: for each image, floor(n/2) of its n
    present values drawn uniformly without replacement, plus 255 always."""
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1).long()
    present = torch.zeros(batch, NUM_VALUES, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    scores = random_rows(generator, batch, NUM_VALUES).to(labels.device)
    scores = torch.where(present, scores, torch.full_like(scores, 2.0))  # absent values sort last
    rank = scores.argsort(1).argsort(1)
    keep = present.sum(1, keepdim=True) // 2
    selected = present & (rank < keep)
    selected[:, IGNORE_INDEX] = True
    return selected


def narrow_labels(labels: torch.Tensor) -> torch.Tensor:
    """A label map as uint8 for the blends: one byte per pixel instead of int64's eight (values are
    0..255 by the blend's contract: label spaces of at most 255 classes, 255 = ignore). Worth a copy where
    one map feeds two blends, as the source labels do in self-training: 9 + 1 + 1 bytes per pixel
    instead of 8 + 8. CPU tensors stay as they are (the reference gathers with int64 indices)."""
    return labels if labels.dtype == torch.uint8 or not labels.is_cuda else labels.to(torch.uint8)


def crdomix(augmented: torch.Tensor, translated: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator | None = None, narrow: torch.Tensor | None = None) -> torch.Tensor:
    """x_cdm = M * x_aug + (1 - M) * G(x_s), M from ``classmix_selection(labels)``; ``narrow``: the same
    labels as uint8 (``narrow_labels``), read by the blend instead when the caller has them."""
    return crdomix_blend(augmented, translated, labels if narrow is None else narrow,
                         classmix_selection(labels, generator))


def classmix(source: torch.Tensor, target: torch.Tensor, source_labels: torch.Tensor, selected: torch.Tensor,
             narrow: torch.Tensor | None = None) -> torch.Tensor:
    """x_mix: the source pixels of the selected classes pasted onto the target image (``narrow`` as in
    :func:`crdomix`)."""
    return crdomix_blend(source, target, source_labels if narrow is None else narrow, selected)


def classmix_labels(selected: torch.Tensor, source_labels: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
    """y_mix = y_s where the source pixel was pasted, the target's label elsewhere."""
    pasted = torch.gather(selected, 1, source_labels.reshape(source_labels.shape[0], -1).long()).view_as(source_labels)
    return torch.where(pasted, source_labels, target_labels)
