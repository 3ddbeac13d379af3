"""Source -> target translators for CrDoMix (method.md, Stage 0): ``translate(x_s) -> x_s2t``, same
geometry, so the source labels stay valid.

* ``fda``: Fourier Domain Adaptation (Yang & Soatto, CVPR 2020): keep the source's phase and its
  high-frequency amplitude, take the low-frequency amplitude (a centred square of side
  2*floor(beta*min(H, W))+1 in the shifted spectrum) from a random target image. Needs no training.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def fda_translate(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Swap the low-frequency amplitude of ``source`` [B, 3, H, W] with that of ``target`` (same
    shape); images in [0, 1]; the result is clamped to [0, 1]."""
    src = torch.fft.fftshift(torch.fft.fft2(source.float()), dim=(-2, -1))
    trg = torch.fft.fftshift(torch.fft.fft2(target.float()), dim=(-2, -1))
    height, width = source.shape[-2:]
    band = int(beta * min(height, width))
    cy, cx = height // 2, width // 2
    amplitude, phase = src.abs(), src.angle()
    rows, cols = slice(cy - band, cy + band + 1), slice(cx - band, cx + band + 1)
    amplitude[..., rows, cols] = trg.abs()[..., rows, cols]
    mixed = torch.polar(amplitude, phase)
    out = torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real
    return out.clamp(0.0, 1.0).to(source.dtype)


class FDATranslator:
    """FDA with style images drawn from a stream of target batches (resized to the source size)."""

    kind = "fda"

    def __init__(self, target_images: Iterator[torch.Tensor], beta: float = 0.01) -> None:
        self.target_images = target_images
        self.beta = beta

    @torch.no_grad()
    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        style = next(self.target_images).to(source.device)
        if style.shape[0] < source.shape[0]:
            repeats = -(-source.shape[0] // style.shape[0])
            style = style.repeat(repeats, 1, 1, 1)
        style = style[: source.shape[0]]
        if style.shape[-2:] != source.shape[-2:]:
            style = F.interpolate(style, size=source.shape[-2:], mode="bilinear", align_corners=False)
        return fda_translate(source, style, self.beta)
