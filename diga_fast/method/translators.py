"""Source -> target translators for CrDoMix (method.md, Stage 0): ``translator(x_s, batch) -> x_s2t``,
same geometry, so the source labels stay valid (``batch`` is the source batch ``x_s`` came from).

* ``fda``: Fourier Domain Adaptation (Yang & Soatto, CVPR 2020): keep the source's phase and its
  high-frequency amplitude, take the low-frequency amplitude (a centred square of side
  2*floor(beta*min(H, W))+1 in the shifted spectrum) from a random target image. Needs no training.
* ``cyclegan``: the frozen source->target generator trained by ``diga train translator``
  (:mod:`diga_fast.stages.translator`), loaded from its ``translator.safetensors``
  (:func:`diga_fast.models.io.load_translator_generator`).
* ``folder``: images translated beforehand (by any model), read with the source batch and cropped
  and flipped with it (:class:`diga_fast.data.translated.TranslatedSource`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from diga_fast.errors import DigaError
from diga_fast.models.io import load_translator_generator


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
    def __call__(self, source: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        style = next(self.target_images).to(source.device)
        if style.shape[0] < source.shape[0]:
            repeats = -(-source.shape[0] // style.shape[0])
            style = style.repeat(repeats, 1, 1, 1)
        style = style[: source.shape[0]]
        if style.shape[-2:] != source.shape[-2:]:
            style = F.interpolate(style, size=source.shape[-2:], mode="bilinear", align_corners=False)
        return fda_translate(source, style, self.beta)


class FolderTranslator:
    """Pre-translated images: the source dataset (wrapped by :func:`diga_fast.data.build.source_train_dataset`)
    already delivers them, aligned with the crop, as ``batch["translated"]``."""

    kind = "folder"

    def __call__(self, source: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        if batch is None or "translated" not in batch:
            raise RuntimeError("the folder translator needs source batches from a TranslatedSource dataset")
        return batch["translated"].to(source.device, source.dtype, non_blocking=True)


def build_translator(recipe, target_images: Iterator[torch.Tensor], device: torch.device):
    """The translator ``recipe.translator`` names: ``fda`` (style from ``target_images``), ``cyclegan``
    (a trained generator from ``diga train translator``), ``folder`` (pre-translated images)."""

    cfg = recipe.translator
    if cfg.kind == "fda":
        return FDATranslator(target_images, beta=cfg.fda_beta)
    if cfg.kind == "cyclegan":
        if not cfg.checkpoint:
            raise DigaError("translator.kind=cyclegan needs translator.checkpoint=RUN_OR_FILE (from diga train translator)")
        return CycleGANTranslator(cfg.checkpoint, device)
    if cfg.kind == "folder":
        return FolderTranslator()
    raise DigaError(f"unknown translator kind {cfg.kind!r}; choose fda, cyclegan or folder")


class CycleGANTranslator:
    """The learned translator: the frozen source->target generator of ``diga train translator``."""

    kind = "cyclegan"

    def __init__(self, checkpoint: str | Path, device: str | torch.device | None = None) -> None:
        self.generator = load_translator_generator(checkpoint, device)

    @torch.no_grad()
    def __call__(self, source: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        generator = self.generator
        if next(generator.parameters()).device != source.device:
            self.generator = generator = generator.to(source.device)
        return generator(source.float()).clamp(0.0, 1.0).to(source.dtype)
