"""Colour grids for looking at a run: one row per image of the batch, one column per view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diga_fast.data.labels import LabelSpace


def save_grid(path: Path, label_space: LabelSpace, images: list[torch.Tensor], labels: list[torch.Tensor],
              max_rows: int = 4) -> None:
    """``images``: [B, 3, H, W] in [0, 1]; ``labels``: [B, h, w] class maps (resized to H x W by
    nearest neighbour). Written atomically as a PNG."""
    from diga_fast.engine.inference import save_png

    height, width = images[0].shape[-2:]
    rows = []
    for b in range(min(max_rows, images[0].shape[0])):
        tiles = [(img[b].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                 for img in images]
        for lab in labels:
            lab = torch.nn.functional.interpolate(lab[b][None, None].float(), size=(height, width), mode="nearest")
            tiles.append(label_space.colorize(lab[0, 0].to(torch.uint8).cpu().numpy()))
        rows.append(np.concatenate(tiles, axis=1))
    save_png(Path(path), np.concatenate(rows, axis=0))
