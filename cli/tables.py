"""The result tables the commands print: per-class IoU of one evaluation, and the several-dataset
(generalisation) table of :func:`diga_fast.inference.target_row` rows."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def iou_table(summary: dict, title: str | None = None) -> RenderableType:
    """A rich table: one row per class, then the mIoU over all K classes (``mIoU19``, ``mIoU16``) and
    each other subset mean (``mIoU13``): one row per number. ``title`` is a line of its own above it,
    wrapped between words when it is longer than the console is wide (not to the narrow table's width)."""
    table = Table()
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, value in summary["iou"].items():
        table.add_row(name, _fmt(value))
    table.add_section()
    whole = f"mIoU{summary['num_classes']}"  # the subset of every class is the mIoU itself
    table.add_row(whole, _fmt(summary["miou"]), style="bold")
    reserved = {"miou", "iou", "num_classes", whole}
    for key, value in summary.items():
        if key not in reserved and (value is None or isinstance(value, float)):
            table.add_row(key, _fmt(value))
    return table if title is None else Group(Text(title, style="bold"), table)


def targets_table(rows: list[dict], title: str | None = None) -> RenderableType:
    """A rich table of :func:`diga_fast.inference.target_row` rows (the generalisation table): one row
    per dataset, columns mIoU and the IoU of each class."""
    table = Table()
    table.add_column("target")
    table.add_column(f"mIoU{rows[0]['num_classes']}", justify="right", style="bold")
    for name in rows[0]["iou"]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["target"], _fmt(row["miou"]), *(_fmt(v) for v in row["iou"].values()))
    return table if title is None else Group(Text(title, style="bold"), table)


def counted(number: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
