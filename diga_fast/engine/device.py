"""Where and how a stage computes: the device (this rank's under torchrun), seeding, bf16 autocast,
and the training forward pass (channels_last, DDP, torch.compile)."""

from __future__ import annotations

import random

import numpy as np
import torch

from diga_fast.config import Recipe
from diga_fast.engine.logging import console
from diga_fast.errors import DigaError
from diga_fast.models import SegmentationModel
from diga_fast.utils import dist


def resolve_device(name: str | None, timeout_minutes: float | None = None) -> torch.device:
    """The device ``--device`` names (default: CUDA when available); under torchrun, this rank's (the
    process group's collectives time out after ``timeout_minutes``)."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DigaError(f"--device {name!r} is not a device (use cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DigaError(f"--device {name}: CUDA is not available on this machine")
    device = dist.setup(device, timeout_minutes)  # under torchrun: join the group, this rank's GPU
    if not dist.current().is_main:
        console.quiet = True  # rank 0 speaks for all
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """``train.threads``: the CPU threads of this process's torch ops (0 leaves torch's default)."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class SeparateForwards(torch.nn.Module):
    """``model`` run once per input batch inside one call: ``(x_a, x_b) -> (model(x_a), model(x_b))``.
    BatchNorm then normalises each group with its own statistics (the official self-training), and
    under DDP a step is still one forward of the wrapped module (two DDP forwards before one backward
    are not allowed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batches: torch.Tensor) -> tuple:
        return tuple(self.model(batch) for batch in batches)


def training_forward(model: SegmentationModel, recipe: Recipe, device: torch.device,
                     *others: torch.nn.Module, separate: bool = False) -> torch.nn.Module:
    """What a stage calls for the training forward pass of ``model``: channels_last (also applied to
    ``others``, e.g. the EMA teacher) when ``train.channels_last``, DistributedDataParallel under
    torchrun, ``torch.compile`` when ``train.compile``; ``separate``: a :class:`SeparateForwards` of it.
    Weights stay those of ``model``."""
    if recipe.train.channels_last:
        for module in (model, *others):
            module.to(memory_format=torch.channels_last)
    trained = dist.wrap(SeparateForwards(model) if separate else model, device)
    if recipe.train.compile:
        trained = torch.compile(trained, backend=recipe.train.compile_backend)
    return trained
