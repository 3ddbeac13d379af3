"""Threshold-free bilateral consensus (method.md Stage 2 steps 1, 2 and 5).

* Feature-induced labels y_feat: each pixel of the teacher's feature takes its nearest class centroid
  (``cosine`` or ``l2``), brought to label resolution.
* Consensus: a target pixel is supervised with y_prob only where y_prob == y_feat; no threshold, no
  weights. The consensus CE is one fused op (``consensus_cross_entropy``), so the mask never exists
  as a tensor on the training path.
* The ablations of ``self_training.labels`` hand other (prob, feat) pairs to the same op:
  ``prob`` (y_prob alone), ``feat`` (y_feat alone), ``threshold`` (y_prob where confident).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diga_fast.labels import IGNORE_INDEX
from diga_fast.kernels import assign_centroids, consensus_cross_entropy
from diga_fast.method.losses import all_pixel_mean, source_cross_entropy
from diga_fast.models import upsample_to
from diga_fast.utils import dist


def feature_labels(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int], metric: str,
                   upsample: str) -> torch.Tensor:
    """y_feat at label size: the nearest centroid of every feature pixel."""
    if upsample == "nearest":
        labels, _ = assign_centroids(features, centroids, metric=metric)
        return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    # "scores" (the official order): softmax over the classes of the similarity (or -distance) at
    # feature resolution, upsampled bilinearly like the logits, then argmax
    f = features.float()
    if metric == "cosine":
        scores = torch.einsum("bchw,kc->bkhw", F.normalize(f, dim=1), F.normalize(centroids.float(), dim=1))
    else:
        scores = -torch.cdist(f.permute(0, 2, 3, 1).flatten(1, 2), centroids.float()[None]).permute(0, 2, 1)
        scores = scores.reshape(f.shape[0], -1, *f.shape[-2:])
    return upsample_to(torch.softmax(scores, dim=1), size).argmax(1)


def target_labels(mode: str, prob: torch.Tensor, feat: torch.Tensor, confidence: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (prob, feat) pair handed to the consensus CE: a pixel is supervised where they agree."""
    if mode == "consensus":
        return prob, feat
    if mode == "prob":
        return prob, prob
    if mode == "feat":
        return feat, feat
    kept = torch.where(confidence >= threshold, prob, torch.full_like(prob, IGNORE_INDEX))
    return kept, kept


def consensus_labels(prob: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """y = y_prob where y_prob == y_feat, else 255 (for the centroid update and for looking at)."""
    return torch.where(prob == feat, prob, torch.full_like(prob, IGNORE_INDEX))


def consensus_loss(logits: torch.Tensor, prob: torch.Tensor, feat: torch.Tensor, train) -> torch.Tensor:
    """CE(logits at label size, y_prob) over the pixels where y_prob == y_feat (and not ignored), through
    the fused kernel; averaged as ``train.ce_normalizer`` says; with ``train.source_loss="ohem"`` (the
    official SYNTHIA recipe) OHEM over those pixels instead. Under torchrun the mean runs over every rank."""
    logits = upsample_to(logits, prob.shape[-2:])
    if train.source_loss == "ohem":
        return source_cross_entropy(logits, consensus_labels(prob, feat), train)
    agree = lambda: ((prob == feat) & (prob != IGNORE_INDEX)).sum()  # noqa: E731
    loss = consensus_cross_entropy(logits, prob, feat)
    if train.ce_normalizer == "all":
        return dist.global_mean(all_pixel_mean(loss, agree(), prob), lambda: torch.tensor(prob.numel()))
    return dist.global_mean(loss, agree)


def label_quality(consensus: torch.Tensor, truth: torch.Tensor, **sources: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of target pixels the consensus keeps, and their accuracy where the true label is known
    (the built-in pair has target labels; real targets report only the share). ``sources`` (e.g.
    ``prob=y_prob, feat=y_feat``) add each full label map's accuracy, ``<name>_accuracy``: what the
    consensus is measured against."""
    kept = consensus != IGNORE_INDEX
    known = truth != IGNORE_INDEX
    quality = {"consensus_kept": kept.float().mean()}
    if bool(known.any()):
        quality["consensus_accuracy"] = (consensus[kept & known] == truth[kept & known]).float().mean() \
            if bool((kept & known).any()) else torch.tensor(float("nan"))
        quality["consensus_kept_known"] = kept[known].float().mean()
        for name, labels in sources.items():
            quality[f"{name}_accuracy"] = (labels[known] == truth[known]).float().mean()
    return quality
