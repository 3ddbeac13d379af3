"""The strong photometric augmentation of the warm-up (method.md, Stage 1, step 1), as batched tensor
ops on the training device, each image drawing its own parameters:

    A = ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, p=0.5)
        -> RandomGrayscale(p=0.3) -> GaussianBlur(3x3, sigma=2, p=0.8) -> Sharpness(0.5, p=0.3)
    x_aug = beta * A(x) + (1 - beta) * x

Images are RGB in [0, 1]. Deliberate difference from the official code: it ran kornia's RGB ops on
Caffe-BGR input in about [-1, 1] (clamping negatives to 0); here the ops see the range they were
designed for. Jitter factors follow torchvision's definitions (brightness/contrast/saturation
multiply by U(1 - s, 1 + s), hue shifts by U(-h, h) turns); sharpness is an unsharp mask
x + f * (x - blur3x3(x)) with f ~ U(0, 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diga_fast.config import StrongAugConfig
from diga_fast.utils.dist import random_rows

_GRAY = (0.299, 0.587, 0.114)


def _per_image(shape: int, generator, device) -> torch.Tensor:
    return random_rows(generator, shape).to(device).view(-1, 1, 1, 1)


def _uniform(batch: int, spread: float, generator, device) -> torch.Tensor:
    return 1.0 + (2.0 * _per_image(batch, generator, device) - 1.0) * spread


def grayscale(x: torch.Tensor) -> torch.Tensor:
    weights = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).expand_as(x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack((hue, sat, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack((5.0 + h * 6, 3.0 + h * 6, 1.0 + h * 6), 1) % 6
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _blur3x3(x: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=x.device, dtype=x.dtype)
    kernel1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel1d = kernel1d / kernel1d.sum()
    kernel = (kernel1d[:, None] * kernel1d[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)


def _where(apply: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(apply, new, old)


def strong_photometric(x: torch.Tensor, cfg: StrongAugConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """A(x): the photometric chain on a batch [B, 3, H, W] in [0, 1]; each image draws its own
    switches and factors (from ``generator``, a CPU generator, for reproducibility)."""
    b, dev = x.shape[0], x.device
    draw = lambda: _per_image(b, generator, dev)  # noqa: E731

    jitter = draw() < cfg.jitter_p
    y = (x * _uniform(b, cfg.brightness, generator, dev)).clamp(0, 1)
    mean = grayscale(y).mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * _uniform(b, cfg.contrast, generator, dev) + mean).clamp(0, 1)
    gray = grayscale(y)
    y = ((y - gray) * _uniform(b, cfg.saturation, generator, dev) + gray).clamp(0, 1)
    hsv = rgb_to_hsv(y)
    shift = (2.0 * draw() - 1.0).view(-1, 1, 1) * cfg.hue
    hsv = torch.stack(((hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]), 1)
    x = _where(jitter, hsv_to_rgb(hsv).clamp(0, 1), x)

    x = _where(draw() < cfg.grayscale_p, grayscale(x), x)
    x = _where(draw() < cfg.blur_p, _blur3x3(x, cfg.blur_sigma), x)
    strength = draw() * cfg.sharpness
    x = _where(draw() < cfg.sharpness_p, (x + strength * (x - _blur3x3(x, 1.0))).clamp(0, 1), x)
    return x


def strong_view(x: torch.Tensor, cfg: StrongAugConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_aug = beta * A(x) + (1 - beta) * x."""
    return cfg.beta * strong_photometric(x, cfg, generator) + (1.0 - cfg.beta) * x
