"""Class centroids c_k (K x D) in the feature space the classifier reads.

* Initial (method.md, "Between stages"): the per-class mean of eval-mode student features over the
  target training images, each pixel assigned to its own argmax class (masked global average pooling,
  one running sum over the whole split).
* Online (Stage 2 step 6): for every (image, class) with at least ``min_pixels`` masked pixels,
  c_k <- (1 - m) c_k + m * mean(features of class k in that image); the images of a batch are applied
  in order, as the official code does. A class seen nowhere keeps its centroid.

Both are built on ``class_feature_sums`` (one fused pass, no per-class loops, no host syncs).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diga_fast.data.loader import usable_workers
from diga_fast.labels import IGNORE_INDEX
from diga_fast.kernels import class_feature_sums
from diga_fast.models import SegmentationModel
from diga_fast.utils import dist


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of [B, H, W] labels to the feature resolution."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return torch.nn.functional.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def agreement_labels(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The class of each feature pixel for centroid statistics: the model's argmax, kept only where
    it equals ``labels`` (brought to feature resolution) when labels are given, else 255."""
    prediction = logits.argmax(1)
    if labels is None:
        return prediction
    labels = downsample_labels(labels, prediction.shape[-2:])
    return torch.where(prediction == labels, prediction, torch.full_like(prediction, IGNORE_INDEX))


@torch.no_grad()
def initial_centroids(model: SegmentationModel, dataset: Dataset, device: torch.device, batch_size: int = 1,
                      num_workers: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [K, D] float32, pixel counts [K] int64) over ``dataset`` (images only). Under
    torchrun each rank reads every world-th image and the sums and counts are summed over ranks.
    ``progress(done, total)`` is called after each batch (images done over all ranks, about)."""
    model.eval()
    sums = torch.zeros(model.num_classes, model.feature_dim, device=device, dtype=torch.float64)
    counts = torch.zeros(model.num_classes, device=device, dtype=torch.int64)
    info = dist.current()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world))
    done = 0
    for batch in DataLoader(shard, batch_size=batch_size, num_workers=usable_workers(num_workers)):
        logits, features = model(batch["image"].to(device))
        batch_sums, batch_counts = class_feature_sums(features, agreement_labels(logits, None), model.num_classes)
        sums += batch_sums.sum(0).double()
        counts += batch_counts.sum(0)
        done += batch["image"].shape[0]
        if progress is not None:
            progress(min(len(dataset), done * info.world), len(dataset))
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(counts)
    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    return centroids.float(), counts


@torch.no_grad()
def update_centroids(centroids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float,
                     min_pixels: int = 5) -> torch.Tensor:
    """One online EMA step per (image, class) with >= ``min_pixels`` pixels of ``labels`` (feature
    resolution, 255 = not counted). Updates ``centroids`` in place and returns it. Under torchrun the
    per-image sums of all ranks are gathered and applied in the global batch's order, so every rank
    ends with the same centroids."""
    sums, counts = class_feature_sums(features, labels, centroids.shape[0])
    sums, counts = dist.gather_rows(sums), dist.gather_rows(counts)
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)
    for image_means, image_counts in zip(means, counts):  # images in order; classes vectorised
        step = (image_counts >= min_pixels).to(centroids.dtype).unsqueeze(1) * momentum
        centroids.mul_(1.0 - step).add_(step * image_means.to(centroids.dtype))
    return centroids
