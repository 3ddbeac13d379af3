"""The optimiser of the segmentation stages (method.md Stage 1 step 5) and its poly schedule."""

from __future__ import annotations

import torch

from diga_fast.config import Recipe
from diga_fast.models import SegmentationModel
from diga_fast.utils import dist


def build_optimizer(model: SegmentationModel, recipe: Recipe) -> torch.optim.SGD:
    """SGD, base LR for the backbone and ``head_lr_mult`` x for the head (method.md step 5)."""
    cfg = recipe.optim
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult, "base_lr": cfg.lr * cfg.head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float) -> float:
    """lr = base_lr * (1 - step / total) ** power for every group; returns the first group's lr."""
    factor = (1.0 - step / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """One optimisation step of ``model`` on ``loss``; under torchrun its BatchNorm statistics are
    then averaged so that every rank (and the EMA teacher built from them) stays identical."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    dist.average_buffers(model)
