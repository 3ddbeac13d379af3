"""What a run tells: the console, progress bars, ``metrics.jsonl`` (+ TensorBoard) and image grids."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diga_fast.data.labels import LabelSpace
from diga_fast.utils.io import atomic_write, save_png

console = Console(stderr=True)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self.writer = None

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint being resumed from (and a last line
        cut short by a kill)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                keep.append(line)
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


@contextmanager
def progress_bar(total: int, description: str, start: int = 0) -> Iterator[Callable[..., None]]:
    """A rich progress bar from step ``start`` (it/s, ETA, the latest values); yields ``tick(step, **values)``;
    plain lines, ten per run, when stderr is not a terminal."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} it/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    start_time = time.perf_counter()
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total, completed=start, rate="-", info="")

        def tick(step: int, **values: Any) -> None:
            rate = (step - start) / max(time.perf_counter() - start_time, 1e-9)
            info = " ".join(f"{k} {float(v.detach() if torch.is_tensor(v) else v):.4f}" for k, v in values.items())
            bar.update(task, completed=step, rate=f"{rate:.2f}", info=info)
            if not console.is_terminal and (step % max(1, total // 10) == 0 or step == total):
                console.print(f"{description}: {step}/{total}  {rate:.2f} it/s  {info}", highlight=False)

        yield tick


def save_grid(path: Path, label_space: LabelSpace, images: list[torch.Tensor], labels: list[torch.Tensor],
              max_rows: int = 4) -> None:
    """A colour grid for looking at a run: one row per image of the batch, one column per view.
    ``images``: [B, 3, H, W] in [0, 1]; ``labels``: [B, h, w] class maps (resized to H x W by nearest
    neighbour). Written atomically as a PNG."""
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


def save_image_rows(path: Path, rows: list[torch.Tensor], images_per_row: int = 4) -> None:
    """A PNG grid of image batches ([B, 3, H, W] in [-1, 1]), one row per batch, images side by side."""
    grid = torch.cat([torch.cat(list(row[:images_per_row].detach().float().cpu()), dim=2) for row in rows], dim=1)
    save_png(Path(path), ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
