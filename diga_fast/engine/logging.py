"""What a run tells: the console, progress bars, ``metrics.jsonl`` (+ TensorBoard) and image grids."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from diga_fast.labels import LabelSpace
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


class _ValuesColumn(ProgressColumn):
    """The latest values (``loss 0.7603``): the part of a bar cut first, with an ellipsis, when the line is
    short, so that the count, the rate and the ETA stay whole at 80 columns."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))

    def render(self, task) -> Text:
        return Text(task.fields.get("info", ""), no_wrap=True, overflow="ellipsis")


_live: Progress | None = None  # the bar on screen: a loop inside it (an evaluation) adds a line to it


@contextmanager
def progress_bar(total: int, description: str, start: int = 0, unit: str = "it") -> Iterator[Callable[..., None]]:
    """A rich progress bar from step ``start`` (count, rate, elapsed, ETA, the latest values); yields
    ``tick(step, **values)``. One line: the description (keep it short, e.g. "warm-up"), then a bar that
    takes what the count, rate and times leave, shared with the values. Inside another bar (an evaluation
    during training) it is a second line of that bar, removed when done. When stderr is not a terminal:
    plain lines, ten per run (none for a bar inside another)."""
    global _live
    start_time = time.perf_counter()
    nested = _live is not None
    if nested:
        bar, context = _live, contextlib.nullcontext()
    else:
        columns = (
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=8)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[rate]}", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TextColumn("ETA", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            _ValuesColumn(),
        )
        bar = context = Progress(*columns, console=console, transient=False, expand=True,
                                 disable=not console.is_terminal)
    with context:
        task = bar.add_task(description, total=total, completed=start, rate=f"- {unit}/s", info="")
        if not nested:
            _live = bar
        try:
            def tick(step: int, **values: Any) -> None:
                rate = (step - start) / max(time.perf_counter() - start_time, 1e-9)
                info = " ".join(f"{k} {float(v.detach() if torch.is_tensor(v) else v):.4f}" for k, v in values.items())
                bar.update(task, completed=step, rate=f"{rate:.2f} {unit}/s", info=info)
                if not console.is_terminal and not nested and (step % max(1, total // 10) == 0 or step == total):
                    console.print(f"{description}: {step}/{total}  {rate:.2f} {unit}/s  {info}".rstrip(), highlight=False)

            yield tick
        finally:
            if nested:
                bar.remove_task(task)
            else:
                _live = None


@contextmanager
def progress_callback(description: str, unit: str = "img") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback for the loops of ``method/`` and ``inference`` (which do not
    import the engine): a :func:`progress_bar` that appears at the first call."""
    with contextlib.ExitStack() as stack:
        tick: Callable[..., None] | None = None

        def progress(done: int, total: int) -> None:
            nonlocal tick
            if tick is None:
                tick = stack.enter_context(progress_bar(total, description, unit=unit))
            tick(done)

        yield progress


def save_grid(path: Path, label_space: LabelSpace, images: list[torch.Tensor], labels: list[torch.Tensor],
              max_rows: int = 4, titles: list[str] | None = None) -> None:
    """A colour grid for looking at a run: one row per image of the batch, one column per view, under a
    header strip naming each column (``titles``: one per image, then one per label map).
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
    if titles is not None:
        if len(titles) != len(images) + len(labels):
            raise ValueError(f"{len(titles)} titles for {len(images) + len(labels)} columns")
        rows.insert(0, title_strip(titles, width))
    save_png(Path(path), np.concatenate(rows, axis=0))


def title_strip(titles: list[str], column_width: int) -> np.ndarray:
    """A white strip [h, len(titles) * column_width, 3] uint8 with each title centred over its column in
    PIL's default font, wrapped at spaces to the column's width (a word wider than it is cut)."""
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    room = max(1, column_width - 4)

    def fit(word: str) -> str:
        while len(word) > 1 and scratch.textlength(word, font=font) > room:
            word = word[:-1]
        return word

    wrapped = []
    for title in titles:
        lines: list[str] = []
        for word in title.split():
            if lines and scratch.textlength(f"{lines[-1]} {word}", font=font) <= room:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(fit(word))
        wrapped.append(lines or [""])
    left, top, right, bottom = scratch.textbbox((0, 0), "Ag", font=font)
    line_height = bottom - top + 2
    strip = Image.new("RGB", (column_width * len(titles), line_height * max(map(len, wrapped)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for index, lines in enumerate(wrapped):
        for row, line in enumerate(lines):
            x = index * column_width + (column_width - draw.textlength(line, font=font)) / 2
            draw.text((x, 2 + row * line_height - top), line, fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.uint8)


def save_image_rows(path: Path, rows: list[torch.Tensor], images_per_row: int = 4) -> None:
    """A PNG grid of image batches ([B, 3, H, W] in [-1, 1]), one row per batch, images side by side."""
    grid = torch.cat([torch.cat(list(row[:images_per_row].detach().float().cpu()), dim=2) for row in rows], dim=1)
    save_png(Path(path), ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
