"""What every segmentation model in diga-fast is: RGB in [0, 1] in, (logits, feature) out.

Input normalisation lives inside the model, so exported graphs take plain RGB images. ``logits``
[B, K, h, w] and ``feature`` [B, D, h, w] are at the network's output stride; the feature is the
D-dimensional tensor the classifier reads (the one centroids are computed on). Losses upsample the
logits to label size themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class SegmentationModel(nn.Module):
    arch: str = ""
    num_classes: int
    feature_dim: int
    output_stride: int

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    freeze_bn_stats: bool = False

    def set_training_options(self, dropout: float | None = None, freeze_bn_stats: bool | None = None) -> SegmentationModel:
        """The recipe's ``model.dropout`` (the classifier's Dropout2d probability; None keeps the
        architecture's) and ``model.freeze_bn_stats`` (BatchNorm normalises with its running statistics
        in training too, so a step does not depend on how the batch is split, e.g. one image per GPU)."""
        if dropout is not None:
            for module in self.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.p = float(dropout)
        if freeze_bn_stats is not None:
            self.freeze_bn_stats = bool(freeze_bn_stats)
            self.train(self.training)
        return self

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.pixel_mean) / self.pixel_std

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters that run at the base learning rate."""
        raise NotImplementedError

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters that run at ``head_lr_mult`` x the base learning rate."""
        raise NotImplementedError


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of logits (or any per-pixel scores) to label size (align_corners=True, as
    the official code)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], problem,
                     optional: tuple[str, ...] = ()) -> None:
    """Every key of ``expected`` in ``state`` with its shape (keys ending in one of ``optional`` may be
    missing), and nothing else; raises ``problem(detail)`` (a DigaError naming the file) at the first miss."""
    for key, tensor in expected.items():
        if key not in state:
            if optional and key.endswith(optional):
                continue
            raise problem(f"missing key {key}")
        if state[key].shape != tensor.shape:
            raise problem(f"key {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise problem(f"unexpected key {unexpected[0]}")
