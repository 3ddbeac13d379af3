"""``diga data``: the built-in pair written in the real folder layouts, and a source translated once
into a folder (for ``translator.kind=folder``) by a trained translator."""

from __future__ import annotations

from pathlib import Path

import torch

from diga_fast.data import build_dataset
from diga_fast.data.domain_layouts import BUILTIN_LAYOUTS, write_builtin_pair
from diga_fast.data.translated import write_translated
from diga_fast.engine.device import resolve_device
from diga_fast.engine.logging import progress_bar, progress_callback
from diga_fast.labels import CITYSCAPES19
from diga_fast.models.io import load_translator_generator


def write_pair(out: str | Path, train_images: int, val_images: int, seed: int = 0, real_sizes: bool = False) -> list[Path]:
    """``diga data synth``: :func:`~diga_fast.data.domain_layouts.write_builtin_pair` with a progress bar;
    returns the folders written, ``out/gta5``, ``out/synthia`` and ``out/cityscapes`` first."""
    root = Path(out)
    with progress_bar(3 * train_images + val_images, "writing", unit="img") as tick:
        write_builtin_pair(root, train_images, val_images, seed, tick, real_sizes)
    return [root / name for name in BUILTIN_LAYOUTS]


def translate_source(checkpoint: str | Path, source: str, out: str | Path, synthetic_images: int, seed: int = 0,
                     device: str | None = None) -> tuple[int, int]:
    """``diga data translate``: every source training image through the translator of ``checkpoint``, at
    its stored size, into ``out/NAME.png``; returns (written now, images in all)."""
    dev = resolve_device(device)
    generator = load_translator_generator(checkpoint, dev)
    dataset = build_dataset(source, role="source", split="train", label_space=CITYSCAPES19, transform=None,
                            with_labels=False, synthetic_images=synthetic_images, seed=seed)

    @torch.no_grad()
    def translate(image):
        x = torch.from_numpy(image.transpose(2, 0, 1).copy()).to(dev).float().div(255.0)
        return generator(x[None])[0].clamp(0.0, 1.0).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()

    with progress_callback("translating") as progress:
        written = write_translated(dataset, translate, Path(out), progress)
    return written, len(dataset)
