"""Confusion matrix, IoU / mIoU (19, 16, 13 classes) and the per-class summary.

One confusion matrix over all evaluated pixels (never a mean of per-image scores), as the official
``runningScore`` and the Cityscapes evaluator (``cityscapesscripts``) do:

    IoU_k = TP_k / (TP_k + FP_k + FN_k),   mIoU = mean of IoU_k over the classes whose union is non-zero

A class with neither ground truth nor prediction has IoU NaN and drops out of the mean; a class with
ground truth that is never predicted correctly has IoU 0. Ground-truth pixels equal to
``ignore_index`` (or outside [0, K)) are skipped. A prediction outside [0, K) on a valid pixel is
wrong: a false negative for the true class and a false positive for no class, which is what the
Cityscapes evaluator does with a label-id prediction that is not one of its evaluation classes.
"""

from __future__ import annotations

import math

import torch
from diga_fast.labels import IGNORE_INDEX, LabelSpace


class ConfusionMatrix:
    """Accumulates ``matrix[gt, pred]`` pixel counts (int64, on the device of the data it is fed)."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        # Column K counts valid pixels whose prediction is outside [0, K).
        self._counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """int64 [K, K]: rows are ground truth, columns predictions."""
        return self._counts[:, : self.num_classes]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        """Add one batch. ``pred`` and ``target`` are integer tensors of the same shape (class
        indices, e.g. [B, H, W]); no host synchronisation happens here."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class indices (argmax the logits first)")
        k = self.num_classes
        if self._counts.device != pred.device:
            self._counts = self._counts.to(pred.device)
        target = target.to(pred.device).reshape(-1).long()
        pred = pred.reshape(-1).long()
        valid = (target != ignore_index) & (target >= 0) & (target < k)
        pred = torch.where((pred >= 0) & (pred < k), pred, k)
        index = target[valid] * (k + 1) + pred[valid]
        self._counts += torch.bincount(index, minlength=k * (k + 1)).view(k, k + 1)

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of an initialised torch.distributed group (no-op otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts)

    def iou(self) -> torch.Tensor:
        """float64 [K] on the CPU; NaN where a class has no ground truth and no prediction."""
        counts = self._counts.cpu().double()
        tp = counts.diagonal()
        ground_truth = counts.sum(dim=1)  # includes predictions outside [0, K): false negatives
        predicted = counts[:, : self.num_classes].sum(dim=0)
        union = ground_truth + predicted - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self, subset: tuple[int, ...] | list[int] | None = None) -> float:
        """Mean IoU in percent over ``subset`` (class indices; all classes when None), NaN ignored.
        NaN when every class of the subset is NaN."""
        iou = self.iou()
        if subset is not None:
            iou = iou[list(subset)]
        return float(iou.nanmean()) * 100.0


def _percent_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def summarize(cm: ConfusionMatrix, label_space: LabelSpace) -> dict:
    """``{"miou": %, "iou": {class: % or None}, "num_classes": K, <subset>: %, ...}``.

    Percentages are floats; NaN (no ground truth and no prediction) becomes None so the dict is valid
    JSON. Subsets are the label space's ``eval_subsets`` (e.g. "mIoU16", "mIoU13" for SYNTHIA)."""
    if cm.num_classes != label_space.num_classes:
        raise ValueError(
            f"confusion matrix has {cm.num_classes} classes, label space {label_space.name!r} has "
            f"{label_space.num_classes}"
        )
    iou = cm.iou() * 100.0
    summary: dict = {
        "miou": _percent_or_none(cm.miou()),
        "iou": {name: _percent_or_none(float(v)) for name, v in zip(label_space.classes, iou.tolist())},
        "num_classes": label_space.num_classes,
    }
    for name, subset in label_space.eval_subsets.items():
        summary[name] = _percent_or_none(cm.miou(subset))
    return summary


__all__ = ["ConfusionMatrix", "summarize"]
