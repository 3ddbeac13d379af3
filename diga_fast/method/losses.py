"""Loss terms. Each is the plain PyTorch form of a line in method.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diga_fast.labels import IGNORE_INDEX
from diga_fast.models import upsample_to
from diga_fast.utils import dist


def segmentation_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, labels) with ignore index 255, averaged over valid pixels (method.md: diga-fast
    averages over valid pixels; the official code divides by all pixels). 0 when none is valid."""
    logits = upsample_to(logits, labels.shape[-2:]).float()
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)


def _ohem_kept_losses(logits: torch.Tensor, labels: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """Per-pixel CE of the pixels OHEM keeps (1-D; empty when none is), see :func:`ohem_cross_entropy`."""
    logits = upsample_to(logits, labels.shape[-2:]).float()
    labels = labels.long()
    pixel_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    p_true = torch.exp(-pixel_loss.detach())[valid]  # softmax probability of the true class
    if p_true.numel() == 0:
        return pixel_loss[valid]
    kth = min(int(min_kept), p_true.numel() - 1)
    threshold = torch.clamp(torch.kthvalue(p_true, kth + 1).values, min=thresh)
    return pixel_loss[valid][p_true < threshold]


def _mean_or_zero(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else logits.sum() * 0.0


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, thresh: float = 0.7,
                       min_kept: int = 100_000) -> torch.Tensor:
    """Online hard example mining CE (the official SYNTHIA source loss, HRNet's ``OhemCrossEntropy``):
    of the valid pixels, keep those whose probability of the true class is below
    max(``thresh``, the (``min_kept``+1)-th smallest such probability), and average CE over them.
    So at least ``min_kept`` pixels (or all valid ones) count whenever the model is confident, and
    every pixel with p_true < ``thresh`` counts. 0 (with a graph) when no pixel is kept."""
    return _mean_or_zero(_ohem_kept_losses(logits, labels, thresh, min_kept), logits)


def source_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, train) -> torch.Tensor:
    """The supervised source loss the recipe names (``train.source_loss``): ``ce`` or ``ohem``; CE
    averaged over valid pixels or, ``train.ce_normalizer="all"`` (official), over all pixels. Under
    torchrun the mean runs over the pixels of every rank (:func:`diga_fast.utils.dist.global_mean`)."""
    if train.source_loss == "ohem":
        kept = _ohem_kept_losses(logits, labels, train.ohem_thresh, train.ohem_min_kept)
        return dist.global_mean(_mean_or_zero(kept, logits), lambda: torch.tensor(kept.numel()))
    valid = lambda: (labels != IGNORE_INDEX).sum()  # noqa: E731
    loss = segmentation_cross_entropy(logits, labels)
    if train.ce_normalizer == "all":
        return dist.global_mean(all_pixel_mean(loss, valid(), labels), lambda: torch.tensor(labels.numel()))
    return dist.global_mean(loss, valid)


def all_pixel_mean(valid_mean: torch.Tensor, valid_count: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A mean over the valid pixels turned into the official normaliser: the sum over all pixels of
    ``labels``, ignored ones included (no host synchronisation)."""
    return valid_mean * valid_count.to(valid_mean.dtype) / labels.numel()


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean over pixels of -sum_k p_T,k log p_S,k, teacher probabilities detached."""
    teacher_prob = torch.softmax(teacher_logits.detach().float() / temperature, dim=1)
    student_logp = torch.log_softmax(student_logits.float(), dim=1)
    return -(teacher_prob * student_logp).sum(1).mean()


def cross_view_distillation(
    student_clean: torch.Tensor,
    student_mix: torch.Tensor,
    teacher_clean: torch.Tensor,
    teacher_mix: torch.Tensor,
    reverse_scale: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """L_dist = CE(p_T(x_s), p_S(x_cdm)) + s * CE(p_T(x_cdm), p_S(x_s)), averaged over all pixels
    (official behaviour); same-view pairs are not used."""
    return soft_cross_entropy(student_mix, teacher_clean, temperature) + reverse_scale * soft_cross_entropy(
        student_clean, teacher_mix, temperature
    )
