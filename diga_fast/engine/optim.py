"""The optimisers and their schedule: SGD for the segmentation stages (method.md Stage 1 step 5) or, for
the DAFormer network, AdamW as DAFormer trains it; Adam for the translator's generators and
discriminators (Stage 0); poly decay, optionally after a linear warm-up."""

from __future__ import annotations

import torch

from diga_fast.config import Recipe, TranslatorConfig
from diga_fast.models import SegmentationModel
from diga_fast.utils import dist


def build_optimizer(model: SegmentationModel, recipe: Recipe) -> torch.optim.Optimizer:
    """Base LR for the backbone and ``head_lr_mult`` x for the head. ``optim.name``: ``sgd`` (method.md
    step 5) or ``adamw`` (DAFormer; the model's ``no_weight_decay_parameters``, its encoder's norms, form a
    third group without weight decay, as DAFormer's ``norm: decay_mult 0``)."""
    cfg = recipe.optim
    if cfg.name == "adamw":
        return _adamw(model, recipe)
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult, "base_lr": cfg.lr * cfg.head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adamw(model: SegmentationModel, recipe: Recipe) -> torch.optim.AdamW:
    cfg = recipe.optim
    no_decay = {id(p) for p in getattr(model, "no_weight_decay_parameters", lambda: ())()}
    backbone = list(model.backbone_parameters())
    head_lr = cfg.lr * cfg.head_lr_mult
    groups = [
        {"params": [p for p in backbone if id(p) not in no_decay], "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": [p for p in backbone if id(p) in no_decay], "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(model.head_parameters()), "lr": head_lr, "base_lr": head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay)


def translator_optimizer(params, cfg: TranslatorConfig) -> torch.optim.Adam:
    """Adam at ``translator.lr`` with ``translator.betas`` (official: 1e-4, 0.5/0.999), one group with
    its ``base_lr`` for :func:`set_poly_lr`."""
    return torch.optim.Adam([{"params": params, "lr": cfg.lr, "base_lr": cfg.lr}], lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, total: int, power: float, warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """(1 - step / total) ** power, times 1 - (1 - step / warmup_iters) * (1 - warmup_ratio) during the
    first ``warmup_iters`` steps (mmcv's linear warm-up, which DAFormer uses: it scales the poly LR)."""
    factor = (1.0 - step / total) ** power
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Resume ``optimizer``: the per-parameter state (momentum, Adam's moments) from a checkpoint's
    ``state``, the hyperparameters (learning rates, weight decay, momentum) kept from the recipe it was
    built from, so that a resume with ``optim.lr=...`` (after a divergence) trains at that rate."""
    recipe_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyperparameters in zip(optimizer.param_groups, recipe_groups):
        group.update(hyperparameters)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float, warmup_iters: int = 0,
                warmup_ratio: float = 1e-6) -> float:
    """lr = base_lr * :func:`lr_factor` for every group; returns the first group's lr."""
    factor = lr_factor(step, total, power, warmup_iters, warmup_ratio)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """One optimisation step of ``model`` on ``loss``; under torchrun its BatchNorm statistics are
    then averaged so that every rank (and the EMA teacher built from them) stays identical."""
    optimizer.zero_grad(set_to_none=True)
    with dist.collective("the gradient all-reduce of the backward pass (DDP)"):
        loss.backward()
    optimizer.step()
    dist.average_buffers(model)
